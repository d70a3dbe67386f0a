// Package integration holds the end-to-end tests: the nixery-snapshotter
// binary against a real containerd, runc and Nix, running real containers.
// They need root; `hack/test.sh` installs everything they need.
package integration
