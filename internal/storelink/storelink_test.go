package storelink

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// layout makes, below a fresh directory, a store with one file and a
// target directory, and returns them.
func layout(t *testing.T) (base, store, file, target string) {
	base = t.TempDir()
	store = filepath.Join(base, "nix", "store")
	file = filepath.Join(store, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x", "bin", "x")
	target = filepath.Join(base, "var", "snapshots")
	for _, d := range []string{filepath.Dir(file), target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file, []byte("#!/bin/sh\n"), 0o555); err != nil {
		t.Fatal(err)
	}
	return base, store, file, target
}

func mount(t *testing.T, source, target, fstype string, flags uintptr) {
	t.Helper()
	if err := unix.Mount(source, target, fstype, flags, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", source, target, err)
	}
	if flags&unix.MS_REMOUNT == 0 {
		t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	}
}

// readOnlyBind makes dir a read-only bind mount of itself, as NixOS makes
// /nix/store.
func readOnlyBind(t *testing.T, dir string) {
	mount(t, dir, dir, "", unix.MS_BIND)
	mount(t, "", dir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY)
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("writing to the read-only store: %v", err)
	}
}

// assertLinks links file into target through a Linker and checks that
// the link is the store's inode and that no mount was left behind.
func assertLinks(t *testing.T, store, file, target, how string) {
	t.Helper()
	before := mountTable(t)
	l, err := New(store, target)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(l.String(), how) {
		t.Errorf("links through %q, want %q", l, how)
	}
	dst := filepath.Join(target, "x")
	if err := l.Link(file, dst); err != nil {
		t.Fatal(err)
	}
	if err := l.Link(filepath.Join(target, "x"), filepath.Join(target, "y")); err == nil && how != "one mount" {
		t.Error("linked a file from outside the store")
	}
	// A symlink below the target cannot turn a link into the store, which
	// the clone could write. (On one mount, the store is as writable as
	// the kernel makes it: nothing to protect.)
	if how == "one mount" {
		return
	}
	escape := filepath.Join(target, "escape")
	rel, _ := filepath.Rel(target, store)
	if err := os.Symlink(rel, escape); err != nil {
		t.Fatal(err)
	}
	if err := l.Link(file, filepath.Join(escape, "injected")); err == nil {
		t.Error("linked through a symlink")
	}
	if _, err := os.Lstat(filepath.Join(store, "injected")); err == nil {
		t.Error("a link was made in the store")
	}
	a, b := inode(t, file), inode(t, dst)
	if a != b {
		t.Errorf("link has inode %d, store file %d", b, a)
	}
	if after := mountTable(t); after != before {
		t.Errorf("mount table changed:\n%s\nthen:\n%s", before, after)
	}
	t.Cleanup(func() {
		for range 2 {
			if err := l.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
		if err := l.Link(file, filepath.Join(target, "after-close")); err == nil && how != "one mount" {
			t.Error("linked after Close")
		}
	})
}

func inode(t *testing.T, path string) uint64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func mountTable(t *testing.T) string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestSameMount(t *testing.T) {
	testutil.RequireRoot(t)
	_, store, file, target := layout(t)
	assertLinks(t, store, file, target, "one mount")
}

// NixOS: the store is a read-only bind mount of itself, the target on the
// same filesystem.
func TestReadOnlyBindMountedStore(t *testing.T) {
	if !testutil.InMountNamespace(t) {
		return
	}
	_, store, file, target := layout(t)
	readOnlyBind(t, store)
	if err := os.Link(file, filepath.Join(target, "direct")); !errors.Is(err, syscall.EXDEV) {
		t.Fatalf("a plain link across the bind mount: %v, want EXDEV", err)
	}
	assertLinks(t, store, file, target, "private clone of mount")
}

// /nix on a filesystem of its own with the store read-only bind-mounted
// in it, and the target on that filesystem; a target elsewhere cannot be
// linked to.
func TestStoreOnItsOwnFilesystem(t *testing.T) {
	if !testutil.InMountNamespace(t) {
		return
	}
	base, _, _, elsewhere := layout(t)
	nix := filepath.Join(base, "nix")
	mount(t, "tmpfs", nix, "tmpfs", 0)
	store := filepath.Join(nix, "store")
	file := filepath.Join(store, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x", "x")
	target := filepath.Join(nix, "var", "snapshots")
	for _, d := range []string{filepath.Dir(file), target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file, []byte("x"), 0o444); err != nil {
		t.Fatal(err)
	}
	readOnlyBind(t, store)
	assertLinks(t, store, file, target, "private clone of mount "+nix)

	if _, err := New(store, elsewhere); !errors.Is(err, ErrOtherFilesystem) {
		t.Errorf("target on another filesystem: %v, want ErrOtherFilesystem", err)
	}
}

// A store reachable only through a bind mount of its own directory, the
// target through another mount that does not hold the store: no mount holds
// both, which the error says.
func TestNoMountHoldsBoth(t *testing.T) {
	if !testutil.InMountNamespace(t) {
		return
	}
	base, _, _, _ := layout(t)
	disk := filepath.Join(base, "disk")
	if err := os.MkdirAll(disk, 0o755); err != nil {
		t.Fatal(err)
	}
	mount(t, "tmpfs", disk, "tmpfs", 0)
	for _, d := range []string{"a/store/p", "b/target"} {
		if err := os.MkdirAll(filepath.Join(disk, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	store, target := filepath.Join(base, "store"), filepath.Join(base, "target")
	for _, d := range []string{store, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount(t, filepath.Join(disk, "a", "store"), store, "", unix.MS_BIND)
	mount(t, filepath.Join(disk, "b", "target"), target, "", unix.MS_BIND)
	if err := unix.Unmount(disk, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	_, err := New(store, target)
	if err == nil || !strings.Contains(err.Error(), "no mount of device") {
		t.Errorf("New: %v, want no mount holds both", err)
	}
}
