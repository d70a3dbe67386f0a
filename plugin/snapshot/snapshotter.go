// Package snapshot is the `nix` snapshotter: containerd's overlay
// snapshotter, except that layers which name Nix store paths are made from
// /nix/store directly instead of being fetched and unpacked.
package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/snapmount"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// DefaultGCRootsDir holds the Nix GC roots of store paths in snapshots.
const DefaultGCRootsDir = "/nix/var/nix/gcroots/nixery-snapshotter"

// Store is what the snapshotter needs of Nix.
type Store interface {
	// Root makes paths valid in the Nix store (realising those that are
	// not) and GC roots in dir, below Nix's gcroots directory, in a way
	// that a collection already running respects.
	Root(ctx context.Context, dir string, paths []string) error
}

// untrustedLayers counts layers that named store paths this node did not
// make, unpacked from their blobs instead (a cost: the files are copied).
var untrustedLayers = promauto.NewCounter(prometheus.CounterOpts{
	Namespace: "nixery", Name: "snapshot_untrusted_layers_total",
	Help: "Layers naming store paths that this node did not build, unpacked from their blobs instead of linked from the store.",
})

// Snapshotter is a snapshots.Snapshotter for Nix images.
//
// When containerd's unpacker prepares a layer (label
// containerd.io/snapshot.ref names the snapshot it will become) whose labels
// list store paths (labels.StorePathsLabel) that this node's builds claimed
// (Claims), Prepare materialises those paths into the new snapshot,
// commits it under the target and answers AlreadyExists: the
// remote-snapshot protocol by which containerd then skips fetching and
// applying the layer. Labels are claims, not commands: entries that are
// not store paths fail the layer, and store paths this node did not claim
// are left to containerd to unpack from the layer's blob, as any image's.
// Every other call is the overlay snapshotter's.
type Snapshotter struct {
	snapshots.Snapshotter
	gcRoots     string
	store       Store
	claims      *Claims
	trustOthers bool
	mat         *materializer
}

type options struct {
	gcRoots     string
	store       Store
	claims      *Claims
	trustOthers bool
	storeRoot   string
}

// Opt configures the Snapshotter.
type Opt func(*options)

// WithGCRootsDir keeps the GC roots of snapshots' store paths in dir, which
// must be below Nix's gcroots directory to count.
func WithGCRootsDir(dir string) Opt { return func(o *options) { o.gcRoots = dir } }

// WithStore makes and roots store paths through s. Without one, no layer
// is materialised: every layer is unpacked from its blob.
func WithStore(s Store) Opt { return func(o *options) { o.store = s } }

// WithClaims trusts the store-path layers of images this node built.
func WithClaims(c *Claims) Opt { return func(o *options) { o.claims = c } }

// WithTrustOtherImages materialises the store-path layers of images this
// node did not build too (still only valid store paths of this store):
// for nodes whose every image source is trusted.
func WithTrustOtherImages(on bool) Opt { return func(o *options) { o.trustOthers = on } }

// WithStoreRoot reads store paths below dir instead of / (tests).
func WithStoreRoot(dir string) Opt { return func(o *options) { o.storeRoot = dir } }

// New returns a Snapshotter keeping its state under root.
func New(root string, opts ...Opt) (*Snapshotter, error) {
	o := options{gcRoots: DefaultGCRootsDir, storeRoot: "/"}
	for _, opt := range opts {
		opt(&o)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("snapshotter root: %w", err)
	}
	ov, err := overlay.NewSnapshotter(filepath.Join(root, "overlayfs"))
	if err != nil {
		return nil, fmt.Errorf("overlay snapshotter in %s: %w", root, err)
	}
	return &Snapshotter{
		Snapshotter: ov,
		gcRoots:     o.gcRoots,
		store:       o.store,
		claims:      o.claims,
		trustOthers: o.trustOthers,
		mat:         newMaterializer(context.Background(), o.storeRoot, root),
	}, nil
}

// Prepare implements snapshots.Snapshotter.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, opt := range opts {
		if err := opt(&base); err != nil {
			return nil, err
		}
	}
	target := base.Labels[snapshots.LabelSnapshotRef]
	paths, forest, err := labels.LayerContent(base.Labels)
	if err != nil {
		return nil, fmt.Errorf("layer for %s refused: %w", target, err)
	}
	if target == "" || len(paths) == 0 {
		return s.Snapshotter.Prepare(ctx, key, parent, opts...)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("target", target))
	if !s.trusted(base.Labels, target) {
		untrustedLayers.Inc()
		log.G(ctx).Warn("layer names store paths that this node did not build: unpacking it from its blob instead (build images here, or set [snapshotter] trust_other_images)")
		return s.Snapshotter.Prepare(ctx, key, parent, opts...)
	}

	// Another namespace, or an earlier pull, may have made it already.
	if name, err := s.committed(ctx, target, parent); err != nil {
		return nil, err
	} else if name != "" {
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	}
	mounts, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	if err != nil {
		return nil, err
	}
	// The roots are this Prepare's own (another may prepare the same
	// target at once); the committed snapshot names them.
	name, roots := commitName(target, parent), s.rootsDir(key)
	if err := s.fill(ctx, mounts, roots, paths, forest); err != nil {
		snapmount.Discard(ctx, s, key, mounts)
		return nil, err
	}
	labels := maps.Clone(base.Labels)
	labels[rootsLabel] = roots
	if err := s.Snapshotter.Commit(ctx, name, key, snapshots.WithLabels(labels)); err != nil {
		_ = s.Remove(context.WithoutCancel(ctx), key)
		if !errdefs.IsAlreadyExists(err) {
			return nil, fmt.Errorf("commit %s: %w", name, err)
		}
		// Made concurrently by another Prepare: as good as ours.
	}
	log.G(ctx).WithField("paths", len(paths)).Debug("materialised store paths")
	return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// trusted reports whether a layer's store paths may be materialised as the
// snapshot target.
func (s *Snapshotter) trusted(labels map[string]string, target string) bool {
	return s.store != nil && (s.trustOthers || s.claims.Made(labels, target))
}

// fill roots and materialises paths into the active snapshot with mounts:
// the store paths themselves, or when forest is set the symlink forest of
// those packages, written by the same code as the tar layer.
func (s *Snapshotter) fill(ctx context.Context, mounts []mount.Mount, roots string, paths []string, forest bool) error {
	dir, err := upperDir(mounts)
	if err != nil {
		return err
	}
	// Valid and rooted before reading: a concurrent `nix-store --gc` must
	// not take a path out from under us.
	if err := s.store.Root(ctx, roots, paths); err != nil {
		return fmt.Errorf("store paths of the layer: %w", err)
	}
	if forest {
		return s.writeForest(ctx, dir, paths)
	}
	return s.mat.materialize(ctx, dir, paths)
}

// writeForest applies the symlink layer's tar, streamed, to dir.
func (s *Snapshotter) writeForest(ctx context.Context, dir string, packages []string) error {
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(tarstream.WriteSymlinkForest(pw, packages, tarstream.WithRoot(s.mat.root)))
	}()
	_, err := archive.Apply(ctx, dir, pr)
	pr.CloseWithError(err)
	if err != nil {
		return fmt.Errorf("symlink forest: %w", err)
	}
	return nil
}

// committed returns the name of a committed snapshot for target on parent.
func (s *Snapshotter) committed(ctx context.Context, target, parent string) (string, error) {
	var found string
	filter := fmt.Sprintf(`labels.%q==%s,parent==%q`, snapshots.LabelSnapshotRef, target, parent)
	err := s.Snapshotter.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		if found == "" && info.Kind == snapshots.KindCommitted && info.Parent == parent && info.Labels[snapshots.LabelSnapshotRef] == target {
			found = info.Name
		}
		return nil
	}, filter)
	if errdefs.IsNotFound(err) {
		// The overlay snapshotter's store is empty until its first snapshot.
		err = nil
	}
	return found, err
}

// upperDir is the directory that holds an active snapshot's own changes.
func upperDir(mounts []mount.Mount) (string, error) {
	if dir, _, _ := snapmount.Writable(mounts); dir != "" {
		return dir, nil
	}
	return "", fmt.Errorf("no writable directory in mounts %+v: %w", mounts, errdefs.ErrInternal)
}

// Remove implements snapshots.Snapshotter; it also drops the snapshot's GC
// roots: those its Prepare made (named by a label once committed).
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	roots := s.rootsDir(key)
	if info, err := s.Snapshotter.Stat(ctx, key); err == nil {
		if dir := info.Labels[rootsLabel]; filepath.Dir(dir) == s.gcRoots {
			roots = dir
		}
	}
	if err := s.Snapshotter.Remove(ctx, key); err != nil {
		return err
	}
	_ = os.RemoveAll(roots)
	return nil
}

// Close implements snapshots.Snapshotter.
func (s *Snapshotter) Close() error {
	return errors.Join(s.Snapshotter.Close(), s.mat.close())
}

// rootsLabel names, on a committed snapshot, the directory of its GC roots.
// (Not under containerd.io/snapshot/: no image can set it.)
const rootsLabel = "nixery-snapshotter/gc-roots"

// commitName is the backend name of a materialised layer: unique per
// target and parent, stable across restarts.
func commitName(target, parent string) string {
	sum := sha256.Sum256([]byte(parent))
	return "nixery/" + hex.EncodeToString(sum[:8]) + "/" + target
}

// rootsDir is where the Prepare of active snapshot key keeps its roots.
func (s *Snapshotter) rootsDir(key string) string {
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(s.gcRoots, hex.EncodeToString(sum[:16]))
}
