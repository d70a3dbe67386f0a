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
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// DefaultGCRootsDir holds the Nix GC roots of store paths in snapshots.
const DefaultGCRootsDir = "/nix/var/nix/gcroots/nixery-snapshotter"

// Realiser makes missing store paths present (substitutes or rebuilds them).
type Realiser interface {
	Realise(ctx context.Context, paths []string) error
}

// Snapshotter is a snapshots.Snapshotter for Nix images.
//
// When containerd's unpacker prepares a layer (label
// containerd.io/snapshot.ref names the snapshot it will become) whose labels
// list store paths (StorePathsLabel), Prepare materialises those paths into
// the new snapshot, commits it under the target and answers AlreadyExists:
// the remote-snapshot protocol by which containerd then skips fetching and
// applying the layer. Every other call is the overlay snapshotter's.
type Snapshotter struct {
	snapshots.Snapshotter
	gcRoots  string
	realiser Realiser
	mat      *materializer
}

type options struct {
	gcRoots   string
	realiser  Realiser
	storeRoot string
}

// Opt configures the Snapshotter.
type Opt func(*options)

// WithGCRootsDir keeps the GC roots of snapshots' store paths in dir, which
// must be below Nix's gcroots directory to count.
func WithGCRootsDir(dir string) Opt { return func(o *options) { o.gcRoots = dir } }

// WithRealiser realises store paths that are missing when a layer needs them.
func WithRealiser(r Realiser) Opt { return func(o *options) { o.realiser = r } }

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
		realiser:    o.realiser,
		mat:         &materializer{root: o.storeRoot, parallel: 4},
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
	paths := StorePathsFromLabels(base.Labels)
	forest := SymlinksFromLabels(base.Labels)
	if target == "" || (len(paths) == 0 && len(forest) == 0) {
		return s.Snapshotter.Prepare(ctx, key, parent, opts...)
	}
	if len(forest) > 0 {
		paths = forest
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("target", target))

	// Another namespace, or an earlier pull, may have made it already.
	if name, err := s.committed(ctx, target, parent); err != nil {
		return nil, err
	} else if name != "" {
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	}
	if err := s.ensurePresent(ctx, paths); err != nil {
		return nil, err
	}
	mounts, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	if err != nil {
		return nil, err
	}
	name := commitName(target, parent)
	if err := s.fill(ctx, mounts, name, paths, len(forest) > 0); err != nil {
		if rerr := s.Snapshotter.Remove(context.WithoutCancel(ctx), key); rerr != nil {
			log.G(ctx).WithError(rerr).Warn("removing unfinished snapshot")
		}
		s.removeRoots(name)
		return nil, err
	}
	if err := s.Snapshotter.Commit(ctx, name, key, snapshots.WithLabels(base.Labels)); err != nil {
		_ = s.Snapshotter.Remove(context.WithoutCancel(ctx), key)
		if !errdefs.IsAlreadyExists(err) {
			s.removeRoots(name)
			return nil, fmt.Errorf("commit %s: %w", name, err)
		}
		// Made concurrently by another Prepare: as good as ours.
	}
	log.G(ctx).WithField("paths", len(paths)).Debug("materialised store paths")
	return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// fill roots and materialises paths into the active snapshot with mounts:
// the store paths themselves, or when forest is set the symlink forest of
// those packages, written by the same code as the tar layer.
func (s *Snapshotter) fill(ctx context.Context, mounts []mount.Mount, name string, paths []string, forest bool) error {
	dir, err := upperDir(mounts)
	if err != nil {
		return err
	}
	// Roots before reading: a concurrent `nix-store --gc` must not take a
	// path out from under us.
	if err := s.addRoots(name, paths); err != nil {
		return err
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

// upperDir is the directory that holds an active overlay snapshot's own
// changes: the source of its bind mount when it has no parent, its overlay
// upperdir otherwise.
func upperDir(mounts []mount.Mount) (string, error) {
	if len(mounts) == 1 {
		m := mounts[0]
		switch m.Type {
		case "bind":
			return m.Source, nil
		case "overlay":
			for _, o := range m.Options {
				if dir, ok := strings.CutPrefix(o, "upperdir="); ok {
					return dir, nil
				}
			}
		}
	}
	return "", fmt.Errorf("no writable directory in mounts %+v: %w", mounts, errdefs.ErrInternal)
}

// ensurePresent realises store paths that are not in the store.
func (s *Snapshotter) ensurePresent(ctx context.Context, paths []string) error {
	var missing []string
	for _, p := range paths {
		if _, err := os.Lstat(filepath.Join(s.mat.root, p)); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if s.realiser == nil {
		return fmt.Errorf("store paths missing on this node: %v: %w", missing, errdefs.ErrNotFound)
	}
	log.G(ctx).WithField("paths", missing).Info("realising missing store paths")
	if err := s.realiser.Realise(ctx, missing); err != nil {
		return fmt.Errorf("store paths missing on this node and not realisable: %v: %w", missing, err)
	}
	return nil
}

// Remove implements snapshots.Snapshotter; it also drops the snapshot's GC roots.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	if err := s.Snapshotter.Remove(ctx, key); err != nil {
		return err
	}
	s.removeRoots(key)
	return nil
}

// commitName is the backend name of a materialised layer: unique per
// target and parent, stable across restarts.
func commitName(target, parent string) string {
	sum := sha256.Sum256([]byte(parent))
	return "nixery/" + hex.EncodeToString(sum[:8]) + "/" + target
}

func (s *Snapshotter) rootsDir(name string) string {
	sum := sha256.Sum256([]byte(name))
	return filepath.Join(s.gcRoots, hex.EncodeToString(sum[:16]))
}

// addRoots makes every path a Nix GC root for as long as snapshot name exists.
func (s *Snapshotter) addRoots(name string, paths []string) error {
	dir := s.rootsDir(name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("GC roots: %w", err)
	}
	for _, p := range slices.Compact(slices.Sorted(slices.Values(paths))) {
		link := filepath.Join(dir, filepath.Base(p))
		if err := os.Symlink(p, link); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("GC root for %s: %w", p, err)
		}
	}
	return nil
}

func (s *Snapshotter) removeRoots(name string) {
	_ = os.RemoveAll(s.rootsDir(name))
}
