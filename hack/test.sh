#!/usr/bin/env bash
# Runs the whole test suite: installs what it needs (hack/setup.sh), then
# vets, checks formatting and runs every test, including the integration
# tests against a real containerd, runc and Nix, and the fuzz seed corpora,
# after every benchmark once on small inputs, so that none of them rots
# (hack/bench.sh runs them at full size).
# Run as root. With CI=true, a test that would skip fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/setup.sh
export PATH="/usr/local/bin:$PATH"

unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:" >&2
  echo "$unformatted" >&2
  exit 1
fi
go vet ./...
go test -count=1 -run '^$' -bench . -benchtime 1x ./...
# One package at a time: they share this machine's Nix store and one test
# collects its garbage.
go test -count=1 -p 1 "$@" ./...

# Compatibility: the integration tests against containerd 1.7 (all but
# CRI's, whose configuration differs; README, "containerd 1.7").
NIXERY_CONTAINERD_BIN_DIR=/usr/local/lib/nixery-snapshotter/containerd-1.7 \
  go test -count=1 "$@" -run '^Test(Pull|NixSnapshotter|Cache|Registry|Fault|Metrics|Hostile|AllowList)' ./integration

# A modern Nix: the whole suite again in the Debian 13 root hack/setup.sh
# made (Nix 2.26, Debian 13's programs in the test package set, a Nix store
# of its own).
hack/debian13.sh go test -count=1 -p 1 "$@" ./...
