package snapshot

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// containerd's conformance suite: without store-path labels the snapshotter
// must behave exactly like any other.
func TestSnapshotterSuite(t *testing.T) {
	testutil.RequireRoot(t)
	// Named "overlayfs" for the suite, which then expects overlayfs' known
	// limits (renaming a lower directory needs redirect_dir): ordinary
	// layers are exactly the overlay snapshotter's.
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		s, err := New(root, WithGCRootsDir(filepath.Join(root, "gcroots")))
		if err != nil {
			return nil, nil, err
		}
		return s, s.Close, nil
	})
}

const (
	glibc = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-glibc-2.36"
	htop  = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-htop-3.2.2"
)

func fakeStore(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for name, content := range map[string]string{
		glibc + "/lib/libc.so.6":   "libc",
		htop + "/bin/htop":         "htop",
		htop + "/share/doc/README": "readme",
	} {
		p := filepath.Join(root, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte(content), 0o444)
	}
	os.Chmod(filepath.Join(root, htop, "bin/htop"), 0o555)
	os.Symlink("libc.so.6", filepath.Join(root, glibc, "lib/libc.so"))
	return root
}

type countingRealiser struct{ calls [][]string }

func (r *countingRealiser) Realise(ctx context.Context, paths []string) error {
	r.calls = append(r.calls, paths)
	return errdefs.ErrUnavailable
}

func TestPrepareMaterialises(t *testing.T) {
	testutil.RequireRoot(t)
	store := fakeStore(t)
	root := t.TempDir()
	gcroots := filepath.Join(root, "gcroots")
	realiser := &countingRealiser{}
	s, err := New(filepath.Join(root, "state"), WithStoreRoot(store), WithGCRootsDir(gcroots), WithRealiser(realiser))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()

	labels := StorePathAnnotations([]string{glibc, htop})
	labels[snapshots.LabelSnapshotRef] = "sha256:chain1"
	_, err = s.Prepare(ctx, "extract-1", "", snapshots.WithLabels(labels))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v, want AlreadyExists", err)
	}
	name := commitName("sha256:chain1", "")
	info, err := s.Stat(ctx, name)
	if err != nil || info.Kind != snapshots.KindCommitted || info.Labels[snapshots.LabelSnapshotRef] != "sha256:chain1" {
		t.Fatalf("committed snapshot: %+v, %v", info, err)
	}
	if _, err := s.Stat(ctx, "extract-1"); !errdefs.IsNotFound(err) {
		t.Errorf("active snapshot left behind: %v", err)
	}

	// The files are the store's inodes, not copies.
	mounts, err := s.View(ctx, "probe", name)
	if err != nil {
		t.Fatal(err)
	}
	dir := mounts[0].Source // a view of one layer is a bind mount of it
	s.Remove(ctx, "probe")
	for _, f := range []string{htop + "/bin/htop", glibc + "/lib/libc.so.6"} {
		var a, b syscall.Stat_t
		syscall.Stat(filepath.Join(store, f), &a)
		if err := syscall.Stat(filepath.Join(dir, f), &b); err != nil {
			t.Fatal(err)
		}
		if a.Ino != b.Ino {
			t.Errorf("%s is a copy", f)
		}
	}
	if l, _ := os.Readlink(filepath.Join(dir, glibc, "lib/libc.so")); l != "libc.so.6" {
		t.Errorf("symlink reads %q", l)
	}
	if fi, _ := os.Stat(filepath.Join(dir, htop, "share")); fi.Mode().Perm() != 0o555 {
		t.Errorf("directory mode %v", fi.Mode())
	}
	roots, _ := os.ReadDir(s.rootsDir(name))
	if len(roots) != 2 {
		t.Errorf("%d GC roots, want 2", len(roots))
	}

	// A view on top sees the files.
	mounts, err = s.View(ctx, "view", name)
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(target, htop, "share/doc/README"))
	mount.UnmountAll(target, 0)
	if string(b) != "readme" {
		t.Errorf("view reads %q, %v", b, err)
	}
	s.Remove(ctx, "view")

	// Preparing the same target again finds it without work.
	if _, err := s.Prepare(ctx, "extract-2", "", snapshots.WithLabels(labels)); !errdefs.IsAlreadyExists(err) {
		t.Errorf("second Prepare: %v", err)
	}
	if len(realiser.calls) != 0 {
		t.Errorf("realiser called for present paths: %v", realiser.calls)
	}

	// Removing the snapshot drops its roots.
	if err := s.Remove(ctx, name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.rootsDir(name)); !os.IsNotExist(err) {
		t.Errorf("GC roots outlive the snapshot: %v", err)
	}
}

func TestPrepareMissingStorePath(t *testing.T) {
	testutil.RequireRoot(t)
	store := fakeStore(t)
	root := t.TempDir()
	realiser := &countingRealiser{}
	s, err := New(filepath.Join(root, "state"), WithStoreRoot(store), WithGCRootsDir(filepath.Join(root, "gcroots")), WithRealiser(realiser))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	missing := "/nix/store/cccccccccccccccccccccccccccccccc-gone"
	labels := StorePathAnnotations([]string{htop, missing})
	labels[snapshots.LabelSnapshotRef] = "sha256:chain2"
	_, err = s.Prepare(context.Background(), "extract", "", snapshots.WithLabels(labels))
	if err == nil || errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Prepare with a missing path: %v", err)
	}
	if len(realiser.calls) != 1 || len(realiser.calls[0]) != 1 || realiser.calls[0][0] != missing {
		t.Errorf("realiser calls %v", realiser.calls)
	}
	n := 0
	s.Walk(context.Background(), func(context.Context, snapshots.Info) error { n++; return nil })
	if n != 0 {
		t.Errorf("%d snapshots left after a failed Prepare", n)
	}
}

func TestMaterialiseAcrossFilesystems(t *testing.T) {
	testutil.RequireRoot(t)
	store := fakeStore(t)
	// A tmpfs cannot hold links to the store's inodes.
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=16m"); err != nil {
		testutil.Skip(t, "cannot mount tmpfs: "+err.Error())
	}
	defer syscall.Unmount(dir, syscall.MNT_DETACH)
	m := &materializer{root: store, parallel: 2}
	if err := m.materialize(context.Background(), dir, []string{htop, glibc}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, htop, "bin/htop"))
	if err != nil || string(b) != "htop" {
		t.Fatalf("copied file reads %q, %v", b, err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, htop, "bin/htop")); fi.Mode().Perm() != 0o555 {
		t.Errorf("mode %v", fi.Mode())
	}
	if !m.copyOnly.Load() || m.copied.Load() != 3 {
		t.Errorf("copyOnly %v, copied %d", m.copyOnly.Load(), m.copied.Load())
	}
}

// A daemon killed mid-prepare leaves an active snapshot (and maybe roots)
// behind; a restarted snapshotter still prepares the same layer.
func TestPrepareAfterInterruptedPrepare(t *testing.T) {
	testutil.RequireRoot(t)
	store := fakeStore(t)
	root := t.TempDir()
	opts := []Opt{WithStoreRoot(store), WithGCRootsDir(filepath.Join(root, "gcroots"))}
	s, err := New(filepath.Join(root, "state"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	labels := StorePathAnnotations([]string{htop})
	labels[snapshots.LabelSnapshotRef] = "sha256:chain3"
	ctx := context.Background()
	// What Prepare had done when it was killed: the active snapshot exists,
	// half filled, and the roots are in place.
	mounts, err := s.Snapshotter.Prepare(ctx, "extract-killed", "", snapshots.WithLabels(labels))
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := upperDir(mounts)
	os.MkdirAll(filepath.Join(dir, htop, "bin"), 0o755)
	name := commitName("sha256:chain3", "")
	if err := s.addRoots(name, []string{htop}); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s, err = New(filepath.Join(root, "state"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Prepare(ctx, "extract-again", "", snapshots.WithLabels(labels)); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare after restart: %v", err)
	}
	view, err := s.View(ctx, "view", name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(view[0].Source, htop, "share/doc/README")); err != nil {
		t.Errorf("layer incomplete: %v", err)
	}
}
