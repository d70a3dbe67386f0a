#!/usr/bin/env bash
# The demo: starts a private containerd, builds nix.local/shell/htop from
# the offline package set in testdata/pkgs, and runs it. Run as root.
# Everything it starts is stopped and removed when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/setup.sh
export PATH="/usr/local/bin:$PATH"

mkdir -p _output
go build -o _output/nixery-snapshotter ./cmd/nixery-snapshotter

dir=$(mktemp -d /tmp/nixery-demo.XXXXXX)
sock="$dir/containerd.sock"
cat >"$dir/config.toml" <<TOML
version = 3
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
TOML

containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
containerd_pid=$!
cleanup() {
  kill "$containerd_pid" 2>/dev/null && wait "$containerd_pid" 2>/dev/null || true
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $sock" 2>/dev/null || true
  grep -o " $dir/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
  [ -S "$sock" ] && break
  sleep 0.1
done

# The offline package set copies host programs, so Nix builds it without a
# sandbox; there is no binary cache to ask on an air-gapped host.
opts=(--nix-option substituters= --nix-option sandbox=false --nix-option build-users-group=)

echo "+ nixery-snapshotter pull nix.local/shell/htop"
_output/nixery-snapshotter pull --address "$sock" --pkgs-path testdata/pkgs "${opts[@]}" nix.local/shell/htop
echo
echo "+ ctr run --rm nix.local/shell/htop demo htop --version"
ctr --address "$sock" run --rm nix.local/shell/htop demo htop --version 2>/dev/null
echo
echo "+ ctr run --rm nix.local/shell/htop demo bash -c '...'"
ctr --address "$sock" run --rm nix.local/shell/htop demo \
  bash -c 'echo "bash $BASH_VERSION in an image of $(ls /nix/store | wc -l) store paths; /bin has $(ls /bin | wc -l) programs"' 2>/dev/null
