// Package testutil holds helpers shared by tests that need real parts of
// the system: root, Nix, containerd, runc.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// Skip skips t with reason, except in CI (CI=true) where every
// prerequisite is installed and a skip would hide a broken setup.
func Skip(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("in CI nothing may skip: %s", reason)
	}
	t.Skip(reason)
}

// RequireRoot skips t unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (run hack/test.sh as root)")
	}
}

// RequireCommands skips t unless every command is in PATH.
func RequireCommands(t testing.TB, commands ...string) {
	t.Helper()
	for _, c := range commands {
		if _, err := exec.LookPath(c); err != nil {
			Skip(t, "needs "+c+" in PATH (hack/setup.sh installs it)")
		}
	}
}

// RequireNix skips t unless Nix can build as root here.
func RequireNix(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	RequireCommands(t, "nix-instantiate", "nix-store", "nix", "patchelf")
}

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// TestPkgs is the offline package set in testdata/pkgs.
func TestPkgs() string { return filepath.Join(RepoRoot(), "testdata", "pkgs") }

// NixOptions are the Nix settings tests use: no binary cache (there is no
// network), no build users, no sandbox (the test package set copies host
// programs) and aarch64-linux derivations built by the host's bash. The
// test set is on the Nix search path: package sets that tests write import
// it, and evaluation (restrict-eval) reads only the package source and the
// search path, as an operator's overlays would be allowed.
func NixOptions() map[string]string {
	return map[string]string{
		"substituters":      "",
		"build-users-group": "",
		"sandbox":           "false",
		"extra-platforms":   "aarch64-linux",
		"extra-nix-path":    "nixery-test-pkgs=" + TestPkgs(),
	}
}

// HostileStorePaths are entries an attacker's image might put where store
// paths belong, given one real store path.
func HostileStorePaths(storePath string) []string {
	return []string{
		"/etc/shadow",
		"/nix/store/../../../etc",
		storePath + "/../../../../etc/shadow",
		"--option plugin-files /proc/self/cwd/../tmp/x/evil.so",
		"-/nix/store/4bjipwxsbcl40y4ch110jflfmzl2rvsr-x",
		storePath + "\n/etc/shadow",
		storePath + "\x00",
	}
}
