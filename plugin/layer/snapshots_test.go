package layer

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	bolt "go.etcd.io/bbolt"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream/linked"
)

// A snapshotter behind containerd's own metadata store (which gives
// snapshots their names, labels and leases), in this process.
func testSnapshotter(t *testing.T) (snapshots.Snapshotter, leases.Manager) {
	t.Helper()
	dir := t.TempDir()
	sn, err := native.NewSnapshotter(filepath.Join(dir, "native"))
	if err != nil {
		t.Fatal(err)
	}
	return behindMetadata(t, dir, "native", sn)
}

// behindMetadata puts backend sn, named name, behind containerd's metadata
// store, kept in dir.
func behindMetadata(t *testing.T, dir, name string, sn snapshots.Snapshotter) (snapshots.Snapshotter, leases.Manager) {
	t.Helper()
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	bdb, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdb.Close() })
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{name: sn})
	if err := db.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return db.Snapshotter(name), metadata.NewLeaseManager(db)
}

func TestSnapshotDescriber(t *testing.T) {
	testutil.RequireRoot(t) // applying a layer sets owners, as containerd's applier does
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, lm := testSnapshotter(t)
	withLease := func() (context.Context, leases.Lease) {
		lease, err := lm.Create(ctx, leases.WithRandomID())
		if err != nil {
			t.Fatal(err)
		}
		return leases.WithLease(ctx, lease.ID), lease
	}
	claims := testClaims(t)
	d := newSnapshotDescriber(ctx, sn, "native", &linked.Roots{}, testutil.Cache(t), claims, "")
	base, top := testLayer(t), testLayer(t)

	// Unpacked: described as the tar it is, committed under its chain.
	lctx, _ := withLease()
	if err := d.Describe(lctx, "", base); err != nil {
		t.Fatal(err)
	}
	if want := tarDescriptor(t, base); base.Desc.Digest != want.Digest || base.Desc.Size != want.Size {
		t.Fatalf("described %s (%d bytes), the tar is %s (%d bytes)", base.Desc.Digest, base.Desc.Size, want.Digest, want.Size)
	}
	if err := d.Describe(lctx, base.Desc.Digest, top); err != nil {
		t.Fatal(err)
	}
	chain := ChainID(base.Desc.Digest, top.Desc.Digest)
	mounts, err := sn.View(lctx, "view", chain.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []*Layer{base, top} {
		err = mount.WithReadonlyTempMount(ctx, mounts, func(root string) error {
			b, err := os.ReadFile(filepath.Join(root, l.Paths[0], "bin", "pkg"))
			if err == nil && string(b) != "program" {
				t.Errorf("%s in the snapshot holds %q", l.Paths[0], b)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// Found again without a read (the store paths are gone), and held by
	// the lease of the pull that found it.
	for _, l := range []*Layer{base, top} {
		if err := os.RemoveAll(l.Paths[0]); err != nil {
			t.Fatal(err)
		}
	}
	// The same describer, describing the image again from the start
	// (after a cached image turned out stale), finds what it committed.
	if err := d.Describe(lctx, "", &Layer{Paths: base.Paths, Hashes: base.Hashes}); err != nil {
		t.Errorf("describing again: %v", err)
	}
	lctx, lease := withLease()
	again := &Layer{Paths: top.Paths, Hashes: top.Hashes}
	pull := newSnapshotDescriber(lctx, sn, "native", &linked.Roots{}, testutil.Cache(t), claims, "")
	if err := pull.Describe(lctx, base.Desc.Digest, again); err != nil {
		t.Fatalf("snapshot not found: %v", err)
	}
	if err := pull.holdFound(lctx); err != nil {
		t.Fatal(err)
	}
	if again.Desc.Digest != top.Desc.Digest || again.Desc.Size != top.Desc.Size {
		t.Errorf("found %v, unpacked %v", again.Desc, top.Desc)
	}
	held, err := lm.ListResources(ctx, lease)
	if err != nil {
		t.Fatal(err)
	}
	if len(held) != 1 || held[0].ID != chain.String() {
		t.Errorf("lease holds %v, want snapshot %s", held, chain)
	}

	// A snapshot found and then built on is held before it is built on.
	lctx, lease = withLease()
	pull = newSnapshotDescriber(lctx, sn, "native", &linked.Roots{}, testutil.Cache(t), claims, "")
	if err := pull.Describe(lctx, "", &Layer{Paths: base.Paths, Hashes: base.Hashes}); err != nil {
		t.Fatal(err)
	}
	if err := pull.Describe(lctx, base.Desc.Digest, testLayer(t)); err != nil {
		t.Fatal(err)
	}
	held, err = lm.ListResources(ctx, lease)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(held, func(r leases.Resource) bool { return r.ID == base.Desc.Digest.String() }) {
		t.Errorf("lease holds %v, not the snapshot built on, %s", held, base.Desc.Digest)
	}

	// On another chain it is a different snapshot: not found.
	if err := d.Describe(lctx, "", &Layer{Paths: top.Paths, Hashes: top.Hashes}); err == nil {
		t.Error("a layer on another chain was described without its store paths")
	}
}

func testClaims(t *testing.T) *snapshot.Claims {
	t.Helper()
	c, err := snapshot.OpenClaims(filepath.Join(t.TempDir(), "claims"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A snapshot labelled as one of this node's layers by an image that this
// node did not make (containerd copies any image's annotations into its
// snapshots' labels) is not believed: the layer is unpacked from the store.
func TestSnapshotDescriberForgedLabels(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, _ := testSnapshotter(t)
	l := testLayer(t)
	// The attacker's layer: other content, our layer's labels.
	forged := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString("evil"), Size: 4}
	if _, err := sn.Prepare(ctx, "forging", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, forged.Digest.String(), "forging", snapshots.WithLabels(Annotations(l, forged))); err != nil {
		t.Fatal(err)
	}
	if err := newSnapshotDescriber(ctx, sn, "native", &linked.Roots{}, testutil.Cache(t), testClaims(t), "").Describe(ctx, "", l); err != nil {
		t.Fatal(err)
	}
	if l.Desc.Digest == forged.Digest {
		t.Fatalf("the forged snapshot was taken for the layer")
	}
	m := tarstream.Measure(io.Discard)
	if err := l.WriteTar(m); err != nil || l.Desc.Digest != m.Digest() {
		t.Errorf("described %s, the layer is %s (%v)", l.Desc.Digest, m.Digest(), err)
	}
}

// brokenMounts is a snapshotter whose snapshots cannot be written from
// here (as seen from another mount namespace).
type brokenMounts struct{ snapshots.Snapshotter }

func (b brokenMounts) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if _, err := b.Snapshotter.Prepare(ctx, key, parent, opts...); err != nil {
		return nil, err
	}
	return []mount.Mount{{Type: "bind", Source: "/nonexistent/snapshot", Options: []string{"rbind", "rw"}}}, nil
}

// A layer that cannot be written says why and how else to pull, and
// leaves no snapshot behind; one whose store paths are gone says that.
func TestSnapshotDescriberErrors(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, _ := testSnapshotter(t)
	err := newSnapshotDescriber(ctx, brokenMounts{sn}, "native", &linked.Roots{}, testutil.Cache(t), testClaims(t), "").Describe(ctx, "", testLayer(t))
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/snapshot") || !strings.Contains(err.Error(), "--with-layers") || strings.Contains(err.Error(), errUnpackStopped.Error()) {
		t.Errorf("unwritable snapshot: %v", err)
	}
	gone := testLayer(t)
	os.RemoveAll(gone.Paths[0])
	err = newSnapshotDescriber(ctx, sn, "native", &linked.Roots{}, testutil.Cache(t), testClaims(t), "").Describe(ctx, "", gone)
	if err == nil || !strings.Contains(err.Error(), gone.Paths[0]) || strings.Contains(err.Error(), "--with-layers") {
		t.Errorf("store path gone: %v", err)
	}
	n := 0
	sn.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil })
	if n != 0 {
		t.Errorf("%d snapshots left after failed unpacks", n)
	}
}

// A store-path layer whose snapshot is a plain directory on the store's
// filesystem is written as links to the store's files, and described as
// its tar: by hashing the tar the first time, from the cache after that,
// reading nothing.
func TestSnapshotDescriberLinks(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "test")
	l := testLayer(t)
	c := testutil.Cache(t)
	// The test's store is beside the snapshotter's root, on one filesystem.
	links := &linked.Roots{Store: filepath.Dir(l.Paths[0])}
	describe := func() (*Layer, float64, float64) {
		t.Helper()
		sn, _ := testSnapshotter(t)
		got := &Layer{Paths: l.Paths, Hashes: l.Hashes}
		packedBefore, linkedBefore, linksBefore := promtest.ToFloat64(layersPacked), promtest.ToFloat64(layersLinked), testutil.Nlink(t, filepath.Join(l.Paths[0], "bin", "pkg"))
		if err := newSnapshotDescriber(ctx, sn, "native", links, c, testClaims(t), "").Describe(ctx, "", got); err != nil {
			t.Fatal(err)
		}
		// The committed snapshot holds the store's file itself.
		if n := testutil.Nlink(t, filepath.Join(l.Paths[0], "bin", "pkg")); n != linksBefore+1 {
			t.Errorf("the store file has %d links, had %d: the layer did not link it", n, linksBefore)
		}
		return got, promtest.ToFloat64(layersPacked) - packedBefore, promtest.ToFloat64(layersLinked) - linkedBefore
	}
	m := tarstream.Measure(io.Discard)
	if err := l.WriteTar(m); err != nil {
		t.Fatal(err)
	}
	first, packedN, linkedN := describe()
	if first.Desc.Digest != m.Digest() || first.Desc.Size != m.Size() {
		t.Errorf("described %s (%d bytes), the tar is %s (%d bytes)", first.Desc.Digest, first.Desc.Size, m.Digest(), m.Size())
	}
	if packedN != 1 || linkedN != 1 {
		t.Errorf("first time: %v layers packed, %v linked; want 1, 1", packedN, linkedN)
	}
	second, packedN, linkedN := describe()
	if second.Desc.Digest != m.Digest() || packedN != 0 || linkedN != 1 {
		t.Errorf("known layer: described %s, %v layers packed, %v linked; want %s, 0, 1", second.Desc.Digest, packedN, linkedN, m.Digest())
	}
}
