#!/usr/bin/env bash
# Runs a command in the Debian 13 root that hack/setup.sh makes, as on a
# Debian 13 machine: Nix 2.26 (a modern Nix, which current nixpkgs needs),
# Debian 13's host programs and a Nix store of its own, with this
# repository, Go and Go's caches at the same paths as here and the host's
# /usr/local/bin (containerd) lent to it. The test suite runs its tests
# here too. Run as root, e.g. hack/debian13.sh go test ./nixbuild/...
set -euo pipefail

root=${NIXERY_DEBIAN13_ROOT:-/var/cache/nixery-snapshotter/debian-13}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -e "$root/.nixery-setup" ]; then
  echo "debian13: no Debian 13 root at $root: run hack/setup.sh" >&2
  exit 1
fi
# What Go needs of this environment, passed on by name.
goenv=(GOFLAGS="$(go env GOFLAGS)" GOPROXY="$(go env GOPROXY)" GOSUMDB="$(go env GOSUMDB)"
  GONOSUMDB="$(go env GONOSUMDB)" GOPRIVATE="$(go env GOPRIVATE)" GOTOOLCHAIN=local CGO_ENABLED=0
  GOCACHE="$(go env GOCACHE)" GOMODCACHE="$(go env GOMODCACHE)")
binds=("$repo" "$(go env GOROOT)" "$(go env GOCACHE)" "$(go env GOMODCACHE)" /usr/local/bin)
for v in CI SSL_CERT_FILE SSL_CERT_DIR http_proxy https_proxy no_proxy; do
  [ -n "${!v:-}" ] && goenv+=("$v=${!v}")
done

# A private mount namespace: the mounts vanish with the command. The root
# is bind-mounted onto itself first, as containerd needs its root to be a
# mount point in the mount table.
exec unshare --mount --propagation private bash -euc '
  root=$1 repo=$2; shift 2
  binds=(); while [ "$1" != -- ]; do binds+=("$1"); shift; done; shift
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --rbind /dev "$root/dev"
  for dir in "${binds[@]}"; do
    mkdir -p "$dir" "$root$dir"
    mount --bind "$dir" "$root$dir"
  done
  exec chroot "$root" /usr/bin/env -i HOME=/root \
    PATH=/usr/local/bin:'"$(go env GOROOT)"'/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
' debian13 "$root" "$repo" "${binds[@]}" -- "${goenv[@]}" bash -c 'cd "$0" && exec "$@"' "$repo" "$@"
