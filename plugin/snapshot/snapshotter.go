// Package snapshot is the `nix` snapshotter: a remote snapshotter
// (plugin/snapshot/remote) whose filler makes the layers that name Nix
// store paths this node built from /nix/store directly, instead of their
// blobs being fetched and unpacked.
package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot/remote"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream/linked"
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

// Snapshotter is a snapshots.Snapshotter for Nix images: a layer whose
// labels list store paths (labels.StorePathsLabel) that this node's
// builds claimed (Claims) is made by materialising those paths. Labels
// are claims, not commands: entries that are not store paths fail the
// layer, and store paths this node did not claim are left to containerd
// to unpack from the layer's blob, as any image's.
type Snapshotter struct {
	*remote.Snapshotter
	filler *storeFiller
}

// storeFiller is the remote.Filler of store-path layers: it roots their
// paths (GC roots per snapshot) and materialises them, or their symlink
// forest.
type storeFiller struct {
	gcRoots     string
	store       Store
	claims      *Claims
	trustOthers bool
	layers      *linked.Writer
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
	f := &storeFiller{gcRoots: o.gcRoots, store: o.store, claims: o.claims, trustOthers: o.trustOthers}
	rs, err := remote.New(root, f)
	if err != nil {
		return nil, err
	}
	// Made in root, which remote.New makes.
	f.layers = linked.New(context.Background(), "nix", root, linked.WithStoreRoot(o.storeRoot))
	return &Snapshotter{Snapshotter: rs, filler: f}, nil
}

// Close implements snapshots.Snapshotter.
func (s *Snapshotter) Close() error {
	return errors.Join(s.Snapshotter.Close(), s.filler.layers.Close())
}

// Fills implements remote.Filler: layers naming store paths this node
// built, when there is a store to root them in.
func (f *storeFiller) Fills(ctx context.Context, layer map[string]string) (bool, error) {
	paths, _, err := labels.LayerContent(layer)
	if err != nil || len(paths) == 0 {
		return false, err
	}
	target := layer[snapshots.LabelSnapshotRef]
	if target == "" {
		return false, nil // not a layer containerd unpacks
	}
	if f.store == nil || !(f.trustOthers || f.claims.Made(layer, target)) {
		untrustedLayers.Inc()
		log.G(ctx).WithField("target", target).Warn("layer names store paths that this node did not build: unpacking it from its blob instead (build images here, or set [snapshotter] trust_other_images)")
		return false, nil
	}
	return true, nil
}

// Fill implements remote.Filler: it roots and materialises the layer's
// store paths into dir, or when it is the symlink layer the symlink
// forest of those packages, written by the same code as the tar layer.
// The roots are this Prepare's own (another may prepare the same target
// at once); the committed snapshot names them.
func (f *storeFiller) Fill(ctx context.Context, key, dir string, layer map[string]string) (map[string]string, error) {
	paths, forest, err := labels.LayerContent(layer)
	if err != nil {
		return nil, err
	}
	roots := f.rootsDir(key)
	// Valid and rooted before reading: a concurrent `nix-store --gc` must
	// not take a path out from under us.
	if err := f.store.Root(ctx, roots, paths); err != nil {
		return nil, fmt.Errorf("store paths of the layer: %w", err)
	}
	if forest {
		var user tarstream.User
		user, err = layerUser(layer)
		if err != nil {
			return nil, err
		}
		err = f.writeForest(ctx, dir, paths, user)
	} else {
		err = f.layers.Write(ctx, dir, paths)
	}
	if err != nil {
		return nil, err
	}
	log.G(ctx).WithField("paths", len(paths)).Debug("materialised store paths")
	return map[string]string{rootsLabel: roots}, nil
}

// Release implements remote.Filler: it drops the snapshot's GC roots,
// those its Prepare made (named by a label once committed).
func (f *storeFiller) Release(_ context.Context, key string, labels map[string]string) error {
	roots := f.rootsDir(key)
	if dir := labels[rootsLabel]; filepath.Dir(dir) == f.gcRoots {
		roots = dir
	}
	return os.RemoveAll(roots)
}

// layerUser is the image user a symlink layer's labels name: root without
// labels.UserLabel, else the label exactly as tarstream.User's Key writes
// it.
func layerUser(layer map[string]string) (tarstream.User, error) {
	v, ok := layer[labels.UserLabel]
	if !ok {
		return tarstream.User{}, nil
	}
	u, err := tarstream.ParseUser(v)
	if err == nil && u.Key() != v {
		err = fmt.Errorf("%q is not written as name:uid:gid: %w", v, errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return tarstream.User{}, fmt.Errorf("layer label %s: %w", labels.UserLabel, err)
	}
	return u, nil
}

// writeForest applies the symlink layer's tar of user's image, streamed,
// to dir.
func (f *storeFiller) writeForest(ctx context.Context, dir string, packages []string, user tarstream.User) error {
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(tarstream.WriteSymlinkForest(pw, packages, tarstream.WithRoot(f.layers.StoreRoot()), tarstream.WithUser(user)))
	}()
	_, err := archive.Apply(ctx, dir, pr)
	pr.CloseWithError(err)
	if err != nil {
		return fmt.Errorf("symlink forest: %w", err)
	}
	return nil
}

// rootsLabel names, on a committed snapshot, the directory of its GC roots.
// (Not under containerd.io/snapshot/: no image can set it.)
const rootsLabel = "nixery-snapshotter/gc-roots"

// rootsDir is where the Prepare of active snapshot key keeps its roots.
func (f *storeFiller) rootsDir(key string) string {
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(f.gcRoots, hex.EncodeToString(sum[:16]))
}
