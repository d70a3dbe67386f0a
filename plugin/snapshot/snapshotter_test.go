package snapshot

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/snapmount"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot/remote"
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
	glibc = testutil.FakeGlibc
	htop  = testutil.FakeHtop
)

func fakeStore(t *testing.T) string { return testutil.FakeStore(t) }

// fakeNix roots the paths of a fake store, as Nix would: present paths
// are linked from dir, missing ones are an error naming them.
type fakeNix struct {
	root  string
	calls [][]string
}

func (f *fakeNix) Root(ctx context.Context, dir string, paths []string) error {
	f.calls = append(f.calls, paths)
	var missing []string
	for _, p := range paths {
		if _, err := os.Lstat(filepath.Join(f.root, p)); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("store paths not valid on this node: %v: %w", missing, errdefs.ErrNotFound)
	}
	os.MkdirAll(dir, 0o755)
	for _, p := range paths {
		os.Symlink(p, filepath.Join(dir, filepath.Base(p)))
	}
	return nil
}

// claim is a layer this node made: its labels, as the layer of chain.
type claim struct {
	labels map[string]string
	chain  string
}

// newTestSnapshotter is a snapshotter over a fake store with claims.
func newTestSnapshotter(t *testing.T, claimed ...claim) (*Snapshotter, *fakeNix, string) {
	t.Helper()
	testutil.RequireRoot(t)
	store := fakeStore(t)
	root := t.TempDir()
	claims, err := OpenClaims(filepath.Join(root, "claims"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range claimed {
		if err := claims.Record(c.labels, c.chain); err != nil {
			t.Fatal(err)
		}
	}
	nix := &fakeNix{root: store}
	s, err := New(filepath.Join(root, "state"), WithStoreRoot(store), WithGCRootsDir(filepath.Join(root, "gcroots")),
		WithStore(nix), WithClaims(claims))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, nix, store
}

// layerLabels are a layer's labels as containerd's unpacker sends them.
func unpackLabels(annotations map[string]string, chain string) map[string]string {
	labels := maps.Clone(annotations)
	labels[snapshots.LabelSnapshotRef] = chain
	return labels
}

func TestPrepareMaterialises(t *testing.T) {
	annotations := labels.StorePathAnnotations([]string{glibc, htop})
	s, nix, store := newTestSnapshotter(t, claim{annotations, "sha256:chain1"})
	ctx := context.Background()

	labels := unpackLabels(annotations, "sha256:chain1")
	_, err := s.Prepare(ctx, "extract-1", "", snapshots.WithLabels(labels))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v, want AlreadyExists", err)
	}
	name := remote.CommitName("sha256:chain1", "")
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
	rootsDir := info.Labels[rootsLabel]
	if rootsDir != s.filler.rootsDir("extract-1") {
		t.Errorf("the snapshot names roots %q, its Prepare made %q", rootsDir, s.filler.rootsDir("extract-1"))
	}
	roots, _ := os.ReadDir(rootsDir)
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
	if len(nix.calls) != 1 {
		t.Errorf("Nix asked %d times for one layer: %v", len(nix.calls), nix.calls)
	}

	// Removing the snapshot drops its roots.
	if err := s.Remove(ctx, name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(rootsDir); !os.IsNotExist(err) {
		t.Errorf("GC roots outlive the snapshot: %v", err)
	}
}

func TestPrepareMissingStorePath(t *testing.T) {
	missing := "/nix/store/cccccccccccccccccccccccccccccccc-gone"
	annotations := labels.StorePathAnnotations([]string{htop, missing})
	s, _, _ := newTestSnapshotter(t, claim{annotations, "sha256:chain2"})
	_, err := s.Prepare(context.Background(), "extract", "", snapshots.WithLabels(unpackLabels(annotations, "sha256:chain2")))
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Prepare with a missing path: %v", err)
	}
	n := 0
	s.Walk(context.Background(), func(context.Context, snapshots.Info) error { n++; return nil })
	if n != 0 {
		t.Errorf("%d snapshots left after a failed Prepare", n)
	}
}

// A daemon killed mid-prepare leaves an active snapshot (and maybe roots)
// behind; a restarted snapshotter still prepares the same layer.
func TestPrepareAfterInterruptedPrepare(t *testing.T) {
	testutil.RequireRoot(t)
	store := fakeStore(t)
	root := t.TempDir()
	annotations := labels.StorePathAnnotations([]string{htop})
	claims, err := OpenClaims(filepath.Join(root, "claims"))
	if err != nil {
		t.Fatal(err)
	}
	claims.Record(annotations, "sha256:chain3")
	nix := &fakeNix{root: store}
	opts := []Opt{WithStoreRoot(store), WithGCRootsDir(filepath.Join(root, "gcroots")), WithStore(nix), WithClaims(claims)}
	s, err := New(filepath.Join(root, "state"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	labels := unpackLabels(annotations, "sha256:chain3")
	ctx := context.Background()
	// What Prepare had done when it was killed: the active snapshot exists,
	// half filled, and the roots are in place.
	mounts, err := s.Snapshotter.Snapshotter.Prepare(ctx, "extract-killed", "", snapshots.WithLabels(labels))
	if err != nil {
		t.Fatal(err)
	}
	dir, _, _ := snapmount.Writable(mounts)
	os.MkdirAll(filepath.Join(dir, htop, "bin"), 0o755)
	name := remote.CommitName("sha256:chain3", "")
	if err := nix.Root(ctx, s.filler.rootsDir("extract-killed"), []string{htop}); err != nil {
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

// Labels are claims, not commands: a layer naming store paths this node
// did not build is left to containerd to unpack from its blob (unless the
// operator trusts other images), and labels that name anything but store
// paths fail the layer, touching nothing.
func TestPrepareUntrustedLabels(t *testing.T) {
	s, nix, _ := newTestSnapshotter(t)
	ctx := context.Background()

	// Well-formed, but this node made no such layer; or made it as the
	// layer of another chain (an image copying its labels to commit
	// them as a layer of some other image).
	s.filler.claims.Record(labels.StorePathAnnotations([]string{htop}), "sha256:ours")
	foreign := unpackLabels(labels.StorePathAnnotations([]string{htop}), "sha256:foreign")
	mounts, err := s.Prepare(ctx, "extract-foreign", "", snapshots.WithLabels(foreign))
	if err != nil {
		t.Fatalf("Prepare of a foreign layer: %v", err)
	}
	if dir, _, _ := snapmount.Writable(mounts); dir == "" {
		t.Fatalf("mounts %v", mounts)
	} else if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("a foreign layer was materialised: %v", entries)
	}
	if len(nix.calls) != 0 {
		t.Errorf("Nix asked about a foreign layer's paths: %v", nix.calls)
	}
	s.Remove(ctx, "extract-foreign")

	outside := t.TempDir()
	before, _ := os.ReadDir(outside)
	for _, bad := range append([]string{"/nix/store/../../" + outside, htop + "/../../../../" + outside + "/x"}, testutil.HostileStorePaths(htop)...) {
		for _, annotations := range []map[string]string{
			{labels.StorePathsLabel + ".0": htop + " " + bad},
			{labels.SymlinksLabel + ".0": bad},
		} {
			// Even claimed, and even if other images are trusted.
			s.filler.claims.Record(annotations, "sha256:bad")
			for _, trust := range []bool{false, true} {
				s.filler.trustOthers = trust
				_, err := s.Prepare(ctx, "extract-bad", "", snapshots.WithLabels(unpackLabels(annotations, "sha256:bad")))
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "not Nix store paths") {
					t.Errorf("%q: %v", bad, err)
				}
			}
		}
	}
	s.filler.trustOthers = false
	if after, _ := os.ReadDir(outside); len(after) != len(before) {
		t.Errorf("files appeared outside the snapshotter: %v", after)
	}
	if len(nix.calls) != 0 {
		t.Errorf("Nix was given %v", nix.calls)
	}
	n := 0
	s.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil })
	if n != 0 {
		t.Errorf("%d snapshots left after refused layers", n)
	}

	// Trusted by the operator, a foreign layer is materialised.
	s.filler.trustOthers = true
	if _, err := s.Prepare(ctx, "extract-trusted", "", snapshots.WithLabels(foreign)); !errdefs.IsAlreadyExists(err) {
		t.Errorf("Prepare of a trusted foreign layer: %v", err)
	}
}

// A store path that is itself a symlink out of the store becomes that
// symlink in the layer, resolved inside the container: the host file it
// points at is neither linked nor read.
func TestPrepareSymlinkOutOfStore(t *testing.T) {
	link := "/nix/store/dddddddddddddddddddddddddddddddd-shadow"
	annotations := labels.StorePathAnnotations([]string{link})
	s, nix, store := newTestSnapshotter(t, claim{annotations, "sha256:link"})
	if err := os.Symlink("/etc/shadow", filepath.Join(store, link)); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Prepare(ctx, "extract", "", snapshots.WithLabels(unpackLabels(annotations, "sha256:link"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v (Nix: %v)", err, nix.calls)
	}
	mounts, err := s.View(ctx, "view", remote.CommitName("sha256:link", ""))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Remove(ctx, "view")
	fi, err := os.Lstat(filepath.Join(mounts[0].Source, link))
	if err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("%s in the layer: %v, %v", link, fi, err)
	}
	if target, _ := os.Readlink(filepath.Join(mounts[0].Source, link)); target != "/etc/shadow" {
		t.Errorf("symlink reads %q", target)
	}
}

// A store file named like a whiteout is refused here as on the tar path:
// the same image on every snapshotter, or none.
func TestPrepareWhiteoutName(t *testing.T) {
	annotations := labels.StorePathAnnotations([]string{htop})
	s, _, store := newTestSnapshotter(t, claim{annotations, "sha256:wh"})
	if err := os.WriteFile(filepath.Join(store, htop, "share", ".wh.README"), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	_, err := s.Prepare(context.Background(), "extract", "", snapshots.WithLabels(unpackLabels(annotations, "sha256:wh")))
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), ".wh.README") {
		t.Errorf("Prepare of a layer with a .wh. file: %v", err)
	}
}

// A symlink layer of a non-root image is made with its user's accounts and
// home, owned by the user; a user label not written as this project
// writes it is refused, naming the label.
func TestPrepareSymlinkLayerUser(t *testing.T) {
	annotations := labels.SymlinkAnnotations([]string{htop})
	annotations[labels.UserLabel] = "alice:1001:1002"
	bad := labels.SymlinkAnnotations([]string{htop})
	bad[labels.UserLabel] = "alice"
	s, _, _ := newTestSnapshotter(t, claim{annotations, "sha256:user"}, claim{bad, "sha256:bad"})
	ctx := context.Background()
	if _, err := s.Prepare(ctx, "extract", "", snapshots.WithLabels(unpackLabels(annotations, "sha256:user"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare: %v", err)
	}
	mounts, err := s.View(ctx, "view", remote.CommitName("sha256:user", ""))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Remove(ctx, "view")
	dir := mounts[0].Source
	if b, err := os.ReadFile(filepath.Join(dir, "etc/passwd")); err != nil || !strings.Contains(string(b), "\nalice:x:1001:1002::/home/alice:") {
		t.Errorf("etc/passwd: %q, %v", b, err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "home/alice"), &st); err != nil || st.Uid != 1001 || st.Gid != 1002 {
		t.Errorf("home/alice: owner %d:%d, %v", st.Uid, st.Gid, err)
	}

	_, err = s.Prepare(ctx, "extract-bad", "", snapshots.WithLabels(unpackLabels(bad, "sha256:bad")))
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), labels.UserLabel) {
		t.Errorf("Prepare with user label %q: %v", bad[labels.UserLabel], err)
	}
}

// A user label is read exactly as this project writes it, or refused.
func TestLayerUser(t *testing.T) {
	forest := labels.SymlinkAnnotations([]string{htop})
	if u, err := layerUser(forest); err != nil || !u.Root() {
		t.Errorf("no label: %+v, %v; want root", u, err)
	}
	forest[labels.UserLabel] = "alice:1001:100"
	if u, err := layerUser(forest); err != nil || u.Key() != "alice:1001:100" {
		t.Errorf("alice:1001:100: %+v, %v", u, err)
	}
	for _, bad := range []string{"root", "alice", "1001:100", "alice:1001:100\n", "alice:0:0", "Alice:1:1", "a:1:1:1"} {
		forest[labels.UserLabel] = bad
		if u, err := layerUser(forest); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: %+v, %v; want an invalid argument", bad, u, err)
		}
	}
}
