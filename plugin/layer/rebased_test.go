package layer

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/opencontainers/go-digest"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream/linked"
)

// containerd's overlay snapshotter (which commits onto a parent named at
// Commit) behind its metadata store, in this process, with its root and a
// store on one filesystem.
func testOverlay(t *testing.T) (snapshots.Snapshotter, leases.Manager, string) {
	t.Helper()
	testutil.RequireRoot(t)
	dir := t.TempDir()
	sn, err := overlay.NewSnapshotter(filepath.Join(dir, "overlayfs"))
	if err != nil {
		t.Fatalf("overlay snapshotter: %v", err)
	}
	msn, lm := behindMetadata(t, dir, "overlayfs", sn)
	return msn, lm, filepath.Join(dir, "nix", "store")
}

// storePath makes a store path in store holding bin/NAME, as Nix keeps it.
func storePath(t *testing.T, store, name string) string {
	t.Helper()
	dir := filepath.Join(store, strings.Repeat(name[:1], 32)+"-"+name)
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", name), []byte(name), 0o555); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(dir, "bin", name), filepath.Join(dir, "bin"), dir} {
		if err := os.Chtimes(p, tarstream.Epoch, tarstream.Epoch); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// describeAll describes layers in order with d, then finishes.
func describeAll(ctx context.Context, d *snapshotDescriber, layers []*Layer) error {
	var chain digest.Digest
	for _, l := range layers {
		if err := d.Describe(ctx, chain, l); err != nil {
			return err
		}
		chain = ChainID(chain, l.Desc.Digest)
	}
	return d.Finish(ctx)
}

// Rebased, layers are unpacked at once and committed in order, each onto
// the one below: the same chain, the same content as unpacked one by one.
func TestSnapshotDescriberRebased(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, lm, store := testOverlay(t)
	lease, err := lm.Create(ctx, leases.WithRandomID())
	if err != nil {
		t.Fatal(err)
	}
	ctx = leases.WithLease(ctx, lease.ID)
	names := []string{"base", "mid", "top"}
	var layers []*Layer
	var pkgs []string
	for _, name := range names {
		p := storePath(t, store, name)
		pkgs = append(pkgs, p)
		layers = append(layers, &Layer{Paths: []string{p}, Hashes: []string{"sha256-" + name}})
	}
	layers = append(layers, &Layer{Paths: pkgs, Symlinks: true})
	links := &linked.Roots{Store: store}
	d := newSnapshotDescriber(ctx, sn, "overlayfs", links, testutil.Cache(t), testClaims(t), "", Rebased())
	if err := describeAll(ctx, d, layers); err != nil {
		t.Fatal(err)
	}

	var chain digest.Digest
	for i, l := range layers {
		parent := chain
		chain = ChainID(chain, l.Desc.Digest)
		info, err := sn.Stat(ctx, chain.String())
		if err != nil {
			t.Fatalf("layer %d: %v", i+1, err)
		}
		if info.Kind != snapshots.KindCommitted || info.Parent != parent.String() {
			t.Errorf("layer %d: %s snapshot on %q, want committed on %q", i+1, info.Kind, info.Parent, parent)
		}
	}
	// The top of the chain is the image: every package, and the symlinks.
	mounts, err := sn.View(ctx, "view", chain.String())
	if err != nil {
		t.Fatal(err)
	}
	err = mount.WithReadonlyTempMount(ctx, mounts, func(root string) error {
		for i, name := range names {
			b, err := os.ReadFile(filepath.Join(root, pkgs[i], "bin", name))
			if err != nil || string(b) != name {
				t.Errorf("%s in the image: %q, %v", name, b, err)
			}
			if target, err := os.Readlink(filepath.Join(root, "bin", name)); err != nil || target != filepath.Join(pkgs[i], "bin", name) {
				t.Errorf("/bin/%s in the image: %q, %v", name, target, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Store files are linked, not copied.
	if n := testutil.Nlink(t, filepath.Join(pkgs[0], "bin", "base")); n != 2 {
		t.Errorf("the store's base file has %d links, want 2 (itself and its layer)", n)
	}
	if err := sn.Remove(ctx, "view"); err != nil {
		t.Fatal(err)
	}
	if active := activeSnapshots(t, ctx, sn); len(active) != 0 {
		t.Errorf("active snapshots left: %v", active)
	}
}

// failingCommit fails the commit of one layer's snapshot.
type failingCommit struct {
	snapshots.Snapshotter
	name string
}

var errCommitFailed = errors.New("commit failed here")

func (f failingCommit) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if name == f.name {
		return errCommitFailed
	}
	return f.Snapshotter.Commit(ctx, name, key, opts...)
}

// A layer that fails to commit fails the image, stops the layers above it,
// and leaves no active snapshot behind.
func TestSnapshotDescriberRebasedFails(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, _, store := testOverlay(t)
	var layers []*Layer
	for _, name := range []string{"base", "mid", "top"} {
		layers = append(layers, &Layer{Paths: []string{storePath(t, store, name)}, Hashes: []string{"sha256-" + name}})
	}
	c := testutil.Cache(t)
	// Described once to learn the middle layer's chain.
	probe, _, _ := testOverlay(t)
	if err := describeAll(ctx, newSnapshotDescriber(ctx, probe, "overlayfs", &linked.Roots{}, c, testClaims(t), "", Rebased()), layers); err != nil {
		t.Fatal(err)
	}
	mid := ChainID(layers[0].Desc.Digest, layers[1].Desc.Digest)
	top := ChainID(mid, layers[2].Desc.Digest)

	d := newSnapshotDescriber(ctx, failingCommit{sn, mid.String()}, "overlayfs", &linked.Roots{Store: store}, c, testClaims(t), "", Rebased())
	err := describeAll(ctx, d, []*Layer{
		{Paths: layers[0].Paths, Hashes: layers[0].Hashes},
		{Paths: layers[1].Paths, Hashes: layers[1].Hashes},
		{Paths: layers[2].Paths, Hashes: layers[2].Hashes},
	})
	if !errors.Is(err, errCommitFailed) {
		t.Fatalf("describing: %v, want %v", err, errCommitFailed)
	}
	if _, err := sn.Stat(ctx, top.String()); err == nil {
		t.Error("the layer above the failed one was committed")
	}
	if active := activeSnapshots(t, ctx, sn); len(active) != 0 {
		t.Errorf("active snapshots left: %v", active)
	}

	// A layer that cannot be described (its store path is gone) stops
	// those under way below it.
	gone := &Layer{Paths: []string{filepath.Join(store, strings.Repeat("g", 32)+"-gone")}, Hashes: []string{"sha256-gone"}}
	sn2, _, _ := testOverlay(t)
	d = newSnapshotDescriber(ctx, sn2, "overlayfs", &linked.Roots{Store: store}, testutil.Cache(t), testClaims(t), "", Rebased())
	err = describeAll(ctx, d, []*Layer{{Paths: layers[0].Paths, Hashes: layers[0].Hashes}, gone})
	if err == nil || !strings.Contains(err.Error(), gone.Paths[0]) {
		t.Errorf("describing a layer whose store path is gone: %v", err)
	}
	if active := activeSnapshots(t, ctx, sn2); len(active) != 0 {
		t.Errorf("active snapshots left: %v", active)
	}
}

func activeSnapshots(t *testing.T, ctx context.Context, sn snapshots.Snapshotter) []string {
	t.Helper()
	var active []string
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind != snapshots.KindCommitted {
			active = append(active, info.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return active
}
