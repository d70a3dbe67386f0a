#!/usr/bin/env bash
# Installs what nixery-snapshotter's demo and tests need on Debian 12, as
# root: Nix, runc, patchelf, skopeo, the host programs the offline package
# set in testdata/pkgs is made of, containerd v2.4.2 and the OCI
# distribution-spec conformance suite built from the Go module proxy,
# containerd 1.7 (hack/containerd-1.7) for the compatibility tests, and a
# Debian 13 root with a modern Nix (2.26) in which the tests run again
# (hack/debian13.sh). Safe to run again: it installs only what is missing.
set -euo pipefail

containerd_version=v2.4.2
debs=(nix-bin runc patchelf skopeo docker-registry htop nano moreutils git jq ca-certificates netbase debootstrap)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs Debian packages and /usr/local/bin/containerd)" >&2
  exit 1
fi
if ! command -v go >/dev/null; then
  echo "setup: needs Go (1.21 or newer fetches the toolchain it needs itself)" >&2
  exit 1
fi

missing=()
for deb in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bins=(containerd ctr containerd-shim-runc-v2)
need_containerd=0
for bin in "${bins[@]}"; do
  [ -x "/usr/local/bin/$bin" ] || need_containerd=1
done
/usr/local/bin/containerd --version 2>/dev/null | grep -q " ${containerd_version#v}" || need_containerd=1
if [ "$need_containerd" -eq 1 ]; then
  echo "setup: building containerd $containerd_version"
  for bin in "${bins[@]}"; do
    GOBIN=/usr/local/bin go install "github.com/containerd/containerd/v2/cmd/$bin@$containerd_version"
  done
fi

# The OCI distribution-spec conformance suite, a client of the endpoint the
# project did not write.
conformance_version=v0.0.0-20260831232431-97274622c111
if ! go version -m /usr/local/bin/conformance 2>/dev/null | grep -q "$conformance_version"; then
  echo "setup: building the OCI conformance suite $conformance_version"
  GOBIN=/usr/local/bin go install "github.com/opencontainers/distribution-spec/conformance@$conformance_version"
fi

# containerd 1.7 for the compatibility run: go install cannot build it (its
# go.mod has replace directives), so a small module pins it.
old=/usr/local/lib/nixery-snapshotter/containerd-1.7
want17=$(awk '/containerd\/containerd v/ {print $NF}' "$(dirname "$0")/containerd-1.7/go.mod")
if ! "$old/containerd" --version 2>/dev/null | grep -q " ${want17#v}"; then
  echo "setup: building containerd $want17 (compatibility tests)"
  mkdir -p "$old"
  (cd "$(dirname "$0")/containerd-1.7" && go build -o "$old/" \
    github.com/containerd/containerd/cmd/containerd \
    github.com/containerd/containerd/cmd/containerd-shim-runc-v2)
fi

# A Debian 13 root: a modern Nix (2.26; current nixpkgs needs 2.18 or newer)
# and Debian 13's host programs for the test package set, with a Nix store
# of its own. hack/debian13.sh runs commands in it.
debian13=${NIXERY_DEBIAN13_ROOT:-/var/cache/nixery-snapshotter/debian-13}
# Debian's nix-bin needs libdbi-perl named: debootstrap cannot resolve its
# perl-dbdabi dependency, so packages are installed after it.
debs13=(nix-bin libdbi-perl runc patchelf skopeo docker-registry htop nano moreutils git jq ca-certificates netbase)
if [ "$(cat "$debian13/.nixery-setup" 2>/dev/null)" != "${debs13[*]}" ]; then
  if [ ! -x "$debian13/usr/bin/apt-get" ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
      /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
    echo "setup: making a Debian 13 root in $debian13 (debootstrap from ${mirror:=http://deb.debian.org/debian})"
    rm -rf "$debian13.new"
    mkdir -p "$(dirname "$debian13")"
    debootstrap --variant=minbase trixie "$debian13.new" "$mirror" >"$debian13.log" 2>&1 ||
      { echo "setup: debootstrap failed; its log: $debian13.log" >&2; exit 1; }
    rm -rf "$debian13"
    mv "$debian13.new" "$debian13"
  fi
  echo "setup: installing ${debs13[*]} in $debian13"
  unshare --mount --propagation private bash -euc '
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
      bash -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${*:2} >/dev/null"
  ' debian13 "$debian13" "${debs13[@]}"
  echo "${debs13[*]}" >"$debian13/.nixery-setup"
fi
