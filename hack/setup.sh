#!/usr/bin/env bash
# Installs what nixery-snapshotter's demo and tests need on Debian 12, as
# root: Nix, runc, patchelf, skopeo, the host programs the offline package
# set in testdata/pkgs is made of, containerd v2.4.2 and the OCI
# distribution-spec conformance suite built from the Go module proxy, and
# containerd 1.7 (hack/containerd-1.7) for the compatibility tests. Safe to run again: it installs only what is missing.
set -euo pipefail

containerd_version=v2.4.2
debs=(nix-bin runc patchelf skopeo htop nano moreutils git jq ca-certificates netbase)

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
