package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// countingNix writes Nix commands that log each call (name and arguments,
// one line) to a file and run the real ones; it returns their directory
// and the log.
func countingNix(t testing.TB) (string, string) {
	t.Helper()
	bin := t.TempDir()
	calls := filepath.Join(bin, "calls")
	for _, name := range []string{"nix-instantiate", "nix-build", "nix-store", "nix"} {
		real, err := exec.LookPath(name)
		if err != nil {
			t.Fatal(err)
		}
		script := fmt.Sprintf("#!/bin/sh\necho %s \"$*\" >> %s\nexec %s \"$@\"\n", name, calls, real)
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return bin, calls
}

// evaluations counts the requests Nix evaluated (nix-instantiate; a
// package that must be built is evaluated again by nix-build, which
// builds it).
func evaluations(t testing.TB, calls string) int {
	b, _ := os.ReadFile(calls)
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "nix-instantiate ") {
			n++
		}
	}
	return n
}

// A pinned source's images are cached: a repeated pull starts no Nix, even
// into a fresh containerd, and gives the same image.
func TestCachePinnedImage(t *testing.T) {
	bin, calls := countingNix(t)
	e := newEnv(t)
	e.extraNix = map[string]any{"pinned": true, "bin_dir": bin}
	e.writeConfig(testutil.TestPkgs())
	first := e.mustPull("nix.local/shell/htop")
	if n := evaluations(t, calls); n != 1 {
		t.Fatalf("%d evaluations for the first pull", n)
	}
	if again := e.mustPull("nix.local/shell/htop"); again != first {
		t.Errorf("cached pull gave %s, first %s", again, first)
	}
	if n := evaluations(t, calls); n != 1 {
		t.Errorf("%d evaluations after a second pull of a pinned reference, want 1", n)
	}

	// A fresh containerd lacks the layers: they are written again, still
	// without Nix, and the image runs.
	other := newEnv(t)
	other.root, other.extraNix = e.root, e.extraNix
	other.writeConfig(testutil.TestPkgs())
	if d := other.mustPull("nix.local/shell/htop"); d != first {
		t.Errorf("fresh containerd gave %s, first %s", d, first)
	}
	if n := evaluations(t, calls); n != 1 {
		t.Errorf("%d evaluations after a pull into a fresh containerd, want 1", n)
	}
	if out := other.run("nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}

	// Unpinned (the default for paths): every pull evaluates.
	e.extraNix = map[string]any{"bin_dir": bin}
	e.writeConfig(testutil.TestPkgs())
	e.mustPull("nix.local/shell/htop")
	if n := evaluations(t, calls); n != 2 {
		t.Errorf("%d evaluations after an unpinned pull, want 2", n)
	}
}

var packedLine = regexp.MustCompile(`msg="packed layer" digest="?(sha256:[0-9a-f]+)`)

// A layer two images share is packed (read and hashed) once as a blob.
// Unpacked straight into snapshots, it is read once for each chain of
// layers it lands on: no snapshot is made twice, and one that exists is
// not read.
func TestCacheSharedLayerPackedOnce(t *testing.T) {
	refs := []string{"nix.local/htop", "nix.local/git", "nix.local/git/htop"}
	pullAll := func(e *env, args ...string) map[string]int {
		packed := map[string]int{}
		for _, ref := range refs {
			_, stderr, err := e.pull(append(append([]string{"--log-level", "debug"}, args...), ref)...)
			if err != nil {
				t.Fatalf("pull %s: %v\n%s", ref, err, stderr)
			}
			for _, m := range packedLine.FindAllStringSubmatch(stderr, -1) {
				packed[m[1]]++
			}
		}
		return packed
	}

	packed := pullAll(newEnv(t), "--with-layers")
	if len(packed) < 4 {
		t.Fatalf("only %d layers packed: is the log line gone?", len(packed))
	}
	for d, n := range packed {
		if n != 1 {
			t.Errorf("layer %s packed %d times", d, n)
		}
	}

	e := newEnv(t)
	unpacked := 0
	for _, n := range pullAll(e) {
		unpacked += n
	}
	sns := e.snapshots("overlayfs")
	if unpacked != len(sns) {
		t.Errorf("%d layers unpacked into %d snapshots", unpacked, len(sns))
	}
	if again := pullAll(e); len(again) != 0 {
		t.Errorf("pulled again, layers were unpacked again: %v", again)
	}
}

// A pull killed at any moment (also while it writes a cache record)
// leaves a cache from which later pulls make correct images.
func TestCacheSurvivesKilledPulls(t *testing.T) {
	e := newEnv(t)
	e.extraNix = map[string]any{"pinned": true}
	e.writeConfig(testutil.TestPkgs())
	for i, delay := range []time.Duration{50, 120, 200, 300, 400, 600} {
		cmd := exec.Command(binary, "pull", "--config", e.config, fmt.Sprintf("nix.local/shell/htop:t%d", i))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
	got := e.mustPull("nix.local/shell/htop")

	// The same image, made without any cache.
	clean := newEnv(t)
	if want := clean.mustPull("nix.local/shell/htop"); got != want {
		t.Errorf("after killed pulls: %s, without a cache: %s", got, want)
	}
	if out := e.run("nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}
}
