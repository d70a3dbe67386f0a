#!/usr/bin/env bash
# Runs the benchmarks at full size and prints their figures; ratios are
# measured side by side within one run. Run as root.
#   NIXERY_BENCH_MB   size of the synthetic package for provisioning (1024)
#   BENCHTIME         iterations per benchmark (3x)
set -euo pipefail
cd "$(dirname "$0")/.."

hack/setup.sh
export PATH="/usr/local/bin:$PATH"
export NIXERY_BENCH_MB="${NIXERY_BENCH_MB:-1024}"
benchtime="${BENCHTIME:-3x}"

echo "# $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -r), $(date -u +%F)"
go test -run '^$' -bench . -benchtime "$benchtime" -timeout 60m ./layering ./tarstream ./integration
