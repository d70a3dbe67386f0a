// Package remote is a remote snapshotter: containerd's overlay
// snapshotter, except that a layer its Filler recognises by the labels of
// its Prepare is made by the Filler, in place of containerd fetching and
// applying the layer's blob. This is containerd's remote-snapshot
// protocol: when the unpacker prepares a layer (label
// containerd.io/snapshot.ref names the snapshot it will become), Prepare
// fills and commits the snapshot under that name and answers
// AlreadyExists, and containerd skips the layer. Every other call is the
// overlay snapshotter's.
package remote

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/snapmount"
)

// Filler makes the content of the layers it recognises.
type Filler interface {
	// Fills reports whether the layer a Prepare's labels describe is one
	// the filler makes, or refuses the layer with an error (labels that
	// claim to be the filler's and are not well-formed).
	Fills(ctx context.Context, labels map[string]string) (bool, error)
	// Fill writes the layer into dir, the new active snapshot key's own
	// directory, and returns labels to add to the committed snapshot (what
	// Release will need).
	Fill(ctx context.Context, key, dir string, labels map[string]string) (map[string]string, error)
	// Release drops whatever Fill holds for snapshot key, once it is
	// removed; labels are the snapshot's.
	Release(ctx context.Context, key string, labels map[string]string) error
}

// Snapshotter is the overlay snapshotter, with layers made by a Filler.
type Snapshotter struct {
	snapshots.Snapshotter // the overlay snapshotter
	filler                Filler
}

// New returns a Snapshotter keeping its state under root.
func New(root string, filler Filler) (*Snapshotter, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("snapshotter root: %w", err)
	}
	ov, err := overlay.NewSnapshotter(filepath.Join(root, "overlayfs"))
	if err != nil {
		return nil, fmt.Errorf("overlay snapshotter in %s: %w", root, err)
	}
	return &Snapshotter{Snapshotter: ov, filler: filler}, nil
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
	fills, err := s.filler.Fills(ctx, base.Labels)
	if err != nil {
		return nil, fmt.Errorf("layer for %s refused: %w", target, err)
	}
	if target == "" || !fills {
		return s.Snapshotter.Prepare(ctx, key, parent, opts...)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("target", target))

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
	dir, _, _ := snapmount.Writable(mounts)
	if dir == "" {
		snapmount.Discard(ctx, s, key, mounts)
		return nil, fmt.Errorf("no writable directory in mounts %+v: %w", mounts, errdefs.ErrInternal)
	}
	filled, err := s.filler.Fill(ctx, key, dir, base.Labels)
	if err != nil {
		snapmount.Discard(ctx, s, key, mounts)
		return nil, err
	}
	labels := maps.Clone(base.Labels)
	maps.Copy(labels, filled)
	// Another Prepare may fill the same target at once: each under its
	// own key, committed under one name per target and parent.
	name := CommitName(target, parent)
	if err := s.Snapshotter.Commit(ctx, name, key, snapshots.WithLabels(labels)); err != nil {
		_ = s.Remove(context.WithoutCancel(ctx), key)
		if !errdefs.IsAlreadyExists(err) {
			return nil, fmt.Errorf("commit %s: %w", name, err)
		}
		// Made concurrently by another Prepare: as good as ours.
	}
	return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
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

// Remove implements snapshots.Snapshotter; the filler then releases what
// it held for the snapshot.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var labels map[string]string
	if info, err := s.Snapshotter.Stat(ctx, key); err == nil {
		labels = info.Labels
	}
	if err := s.Snapshotter.Remove(ctx, key); err != nil {
		return err
	}
	// The snapshot is gone: what is left is the filler's to clean up.
	if err := s.filler.Release(ctx, key, labels); err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("releasing what a removed snapshot held")
	}
	return nil
}

// CommitName is the backend name of a filled layer: unique per target and
// parent, stable across restarts.
func CommitName(target, parent string) string {
	sum := sha256.Sum256([]byte(parent))
	return "nixery/" + hex.EncodeToString(sum[:8]) + "/" + target
}
