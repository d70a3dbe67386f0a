package linked

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/storelink"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

func TestWriteAcrossFilesystems(t *testing.T) {
	testutil.RequireRoot(t)
	store := testutil.FakeStore(t)
	// A tmpfs cannot hold links to the store's inodes.
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=16m"); err != nil {
		testutil.Skip(t, "cannot mount tmpfs: "+err.Error())
	}
	defer syscall.Unmount(dir, syscall.MNT_DETACH)
	// Said at start: links cannot be made there, but can beside the store.
	if m := New(context.Background(), "test", filepath.Dir(store), WithStoreRoot(store)); !m.Links() || promtest.ToFloat64(storeLinkable.WithLabelValues("test")) != 1 {
		t.Errorf("beside the store: copyOnly %v, linkable %v", !m.Links(), promtest.ToFloat64(storeLinkable.WithLabelValues("test")))
	}
	m := New(context.Background(), "test", dir, WithStoreRoot(store))
	if !!m.Links() || promtest.ToFloat64(storeLinkable.WithLabelValues("test")) != 0 {
		t.Errorf("across filesystems: copyOnly %v, linkable %v", !m.Links(), promtest.ToFloat64(storeLinkable.WithLabelValues("test")))
	}
	if err := m.Write(context.Background(), dir, []string{testutil.FakeHtop, testutil.FakeGlibc}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, testutil.FakeHtop, "bin/htop"))
	if err != nil || string(b) != "htop" {
		t.Fatalf("copied file reads %q, %v", b, err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, testutil.FakeHtop, "bin/htop")); fi.Mode().Perm() != 0o555 {
		t.Errorf("mode %v", fi.Mode())
	}
	if !!m.Links() || m.Copied() != 3 {
		t.Errorf("copyOnly %v, copied %d", !m.Links(), m.Copied())
	}
}

// A store file that may not be linked (immutable) is copied, and only it:
// linking goes on for the others, and for the next layers.
func TestWriteImmutableFile(t *testing.T) {
	testutil.RequireRoot(t)
	store := testutil.FakeStore(t)
	htop := filepath.Join(store, testutil.FakeHtop, "bin/htop")
	// Immutable before the Writer starts, so that its first link, a probe
	// of some store file, may be to it: that says nothing of the others.
	if err := setImmutable(htop, true); err != nil {
		testutil.Skip(t, "this filesystem has no immutable files: "+err.Error())
	}
	defer setImmutable(htop, false)
	m := New(context.Background(), "test", filepath.Dir(store), WithStoreRoot(store))
	for i := range 2 {
		layer := filepath.Join(filepath.Dir(store), fmt.Sprintf("layer-%d", i))
		if err := os.Mkdir(layer, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := m.Write(context.Background(), layer, []string{testutil.FakeHtop, testutil.FakeGlibc}); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(layer, testutil.FakeHtop, "bin/htop")); err != nil || string(b) != "htop" {
			t.Fatalf("the immutable file reads %q, %v", b, err)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(layer, testutil.FakeGlibc, "lib/libc.so.6"), &st); err != nil || st.Nlink < 2 {
			t.Errorf("layer %d: another file has %d links, %v: want it linked", i, st.Nlink, err)
		}
	}
	if !m.Links() || m.Copied() != 2 || promtest.ToFloat64(storeLinkable.WithLabelValues("test")) != 1 {
		t.Errorf("links %v, copied %d (want the immutable file, in each layer), linkable %v", m.Links(), m.Copied(), promtest.ToFloat64(storeLinkable.WithLabelValues("test")))
	}
}

// A probe that happens on an immutable file says nothing of the others.
func TestProbeImmutableFile(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	store, layers := filepath.Join(dir, "store"), filepath.Join(dir, "layers")
	for _, d := range []string{store, layers} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(store, "only-file")
	if err := os.WriteFile(file, []byte("x"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := setImmutable(file, true); err != nil {
		testutil.Skip(t, "this filesystem has no immutable files: "+err.Error())
	}
	defer setImmutable(file, false)
	l, err := storelink.New(store, layers)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := probe(l, store, layers); err != nil {
		t.Errorf("probe of an immutable file: %v, want nothing said", err)
	}
}

// fsImmutableFL is the inode flag of an immutable file (linux/fs.h
// FS_IMMUTABLE_FL, which x/sys does not name).
const fsImmutableFL = 0x10

// setImmutable sets or clears file's immutable attribute (chattr +i).
func setImmutable(file string, on bool) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return err
	}
	if on {
		flags |= fsImmutableFL
	} else {
		flags &^= fsImmutableFL
	}
	return unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags))
}

// On a fresh node the daemon may start before Nix made its store: how to
// link is found at the first layer, not decided (as "copy") at start.
func TestWriteStoreMadeAfterStart(t *testing.T) {
	root := t.TempDir()
	m := New(context.Background(), "test", root, WithStoreRoot(root))
	store := testutil.FakeStore(t)
	if err := os.Rename(filepath.Join(store, "nix"), filepath.Join(root, "nix")); err != nil {
		t.Fatal(err)
	}
	layer := filepath.Join(root, "layer")
	if err := os.Mkdir(layer, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := m.Write(context.Background(), layer, []string{testutil.FakeHtop}); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(layer, testutil.FakeHtop, "bin/htop"), &st); err != nil || st.Nlink != 2 {
		t.Errorf("layer file: %d links, %v", st.Nlink, err)
	}
	if !m.Links() || m.Copied() != 0 {
		t.Errorf("copyOnly %v, copied %d", !m.Links(), m.Copied())
	}
}

// The one rule of what a store file becomes in an image: a written
// layer and the same store paths' tar, unpacked, hold the same tree
// (types, permissions, owners, mtimes, symlink targets, contents).
func TestWrittenLayerIsTheTar(t *testing.T) {
	testutil.RequireRoot(t)
	store := testutil.FakeStore(t)
	// A file of a store not kept as Nix keeps it (owned by a user, as a
	// single-user install makes it) is copied: the layer is its tar still.
	if err := os.Lchown(filepath.Join(store, testutil.FakeHtop, "share/doc/README"), 1234, 1234); err != nil {
		t.Fatal(err)
	}
	paths := []string{testutil.FakeGlibc, testutil.FakeHtop}
	linked, copied := t.TempDir(), t.TempDir()
	m := New(context.Background(), "test", linked, WithStoreRoot(store))
	if err := m.Write(context.Background(), linked, paths); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(linked, testutil.FakeGlibc, "lib/libc.so.6"), &st); err != nil || st.Nlink != 2 {
		t.Errorf("linked file: %d links, %v", st.Nlink, err)
	}
	if n := m.Copied(); n != 1 {
		t.Errorf("%d files copied, want 1 (the one a user owns)", n)
	}
	m.Close() // copies from here on
	if err := m.Write(context.Background(), copied, paths); err != nil {
		t.Fatal(err)
	}
	unpacked := t.TempDir()
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(tarstream.WriteStorePaths(pw, paths, tarstream.WithRoot(store))) }()
	if _, err := archive.Apply(context.Background(), unpacked, pr); err != nil {
		t.Fatal(err)
	}
	a, b, c := testutil.DescribeTree(t, linked), testutil.DescribeTree(t, unpacked), testutil.DescribeTree(t, copied)
	if !maps.Equal(a, b) {
		t.Errorf("materialised:\n%v\nunpacked tar:\n%v", a, b)
	}
	if !maps.Equal(c, b) {
		t.Errorf("materialised by copies:\n%v\nunpacked tar:\n%v", c, b)
	}
	if len(a) < 8 {
		t.Errorf("compared only %d entries", len(a))
	}
}
