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

// A layer two images share is packed (read and hashed) once, as a blob
// or unpacked straight into snapshots: there, it is linked to the store on
// each chain of layers it lands on, read only the first time, and a
// snapshot that exists is not made again.
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
	packed = pullAll(e)
	for d, n := range packed {
		if n != 1 {
			t.Errorf("layer %s unpacked from a read %d times", d, n)
		}
	}
	if sns := e.snapshots("overlayfs"); len(packed) >= len(sns) {
		t.Errorf("%d layers read for %d snapshots: no layer was linked on a second chain without a read", len(packed), len(sns))
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

// nixCalls counts every Nix command run (countingNix).
func nixCalls(calls string) int {
	b, _ := os.ReadFile(calls)
	return strings.Count(string(b), "\n")
}

// copyPkgs copies the test package set into a directory of its own.
func copyPkgs(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pkgs")
	if out, err := exec.Command("cp", "-r", testutil.TestPkgs(), dir).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	return dir
}

// A package source its configuration leaves unpinned, but that cannot
// change unseen, is cached as a pinned one is: a path whose real location
// is in the store (as nix-channel makes channels) is keyed by that store
// path, a path that is a clean git work tree by its commit. A repeated
// pull runs no Nix at all; once the source moves (the channel is
// updated, a file is edited, a commit made) the next pull evaluates it.
func TestCacheFixedSources(t *testing.T) {
	bin, calls := countingNix(t)
	// pull pulls, and checks the evaluations so far; a pull from the cache
	// runs no Nix command at all.
	pull := func(e *env, evaluated int, cached bool, why string) {
		t.Helper()
		before := nixCalls(calls)
		e.mustPull("nix.local/shell/htop")
		if n := evaluations(t, calls); n != evaluated {
			t.Errorf("%s: %d evaluations in all, want %d", why, n, evaluated)
		}
		if n := nixCalls(calls) - before; cached && n > 0 {
			t.Errorf("%s: %d Nix commands run, want none", why, n)
		}
	}

	// A channel: a symlink into the store, moved by an update.
	roots := t.TempDir()
	addToStore := func(dir string) string {
		t.Helper()
		out, err := exec.Command("nix-store", "--add", dir).Output()
		if err != nil {
			t.Fatalf("nix-store --add: %v", err)
		}
		p := strings.TrimSpace(string(out))
		// Kept from the garbage collector while the test runs.
		root := exec.Command("nix-store", "--realise", "--add-root", filepath.Join(roots, filepath.Base(p)), "--indirect", p)
		if out, err := root.CombinedOutput(); err != nil {
			t.Fatalf("nix-store --add-root: %v\n%s", err, out)
		}
		return p
	}
	pkgs := copyPkgs(t)
	channel := filepath.Join(t.TempDir(), "nixpkgs")
	if err := os.Symlink(addToStore(pkgs), channel); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	e.extraNix = map[string]any{"bin_dir": bin}
	e.writeConfig(channel)
	pull(e, 1, false, "channel, first pull")
	pull(e, 1, true, "channel, again")
	os.WriteFile(filepath.Join(pkgs, "updated"), nil, 0o644)
	if err := os.Remove(channel); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(addToStore(pkgs), channel); err != nil {
		t.Fatal(err)
	}
	pull(e, 2, false, "channel updated")
	pull(e, 2, true, "channel updated, again")

	// A clean git work tree.
	tree := copyPkgs(t)
	git := func(args ...string) { testutil.Git(t, tree, args...) }
	git("init", "-q")
	git("add", ".")
	git("commit", "-q", "-m", "one")
	e.writeConfig(tree)
	pull(e, 3, false, "work tree, first pull")
	pull(e, 3, true, "work tree, again")
	f, err := os.OpenFile(filepath.Join(tree, "default.nix"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("# edited\n")
	f.Close()
	pull(e, 4, false, "work tree edited")
	pull(e, 5, false, "work tree still edited")
	git("commit", "-q", "-am", "two")
	pull(e, 6, false, "edit committed")
	pull(e, 6, true, "edit committed, again")
}
