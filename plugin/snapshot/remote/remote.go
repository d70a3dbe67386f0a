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
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

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
	fills                 singleflight.Group // by backend name: one fill of a layer at a time

	mu sync.Mutex
	// prefilled holds the layers that prefills made, until each prefill
	// is released.
	prefilled map[string]*prefilledLayer
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
	return &Snapshotter{Snapshotter: ov, filler: filler, prefilled: map[string]*prefilledLayer{}}, nil
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
	l := fillable{target: target, parent: parent, labels: base.Labels}
	// Made here, found (another namespace, an earlier pull or a prefill
	// made it), or being made by another Prepare or a prefill: once it is
	// committed, containerd adopts it. Tried again only if it was removed
	// in between (a prefill released, nothing having taken it).
	for try := 0; try < 3; try++ {
		if err := s.ensure(ctx, key, l, opts, nil, parentCommitted); err != nil {
			return nil, err
		}
		if ok, err := s.answer(ctx, l); err != nil {
			return nil, err
		} else if ok {
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
	}
	return nil, fmt.Errorf("layer for %s removed as often as it was made: %w", target, errdefs.ErrAborted)
}

// fillable is a layer that the Filler makes: target's on parent (a
// backend name), described by labels, as the unpacker's Prepare has them.
type fillable struct {
	target, parent string
	labels         map[string]string
}

// name is the backend name the layer is committed under.
func (l fillable) name() string { return CommitName(l.target, l.parent) }

// ensure makes the committed snapshot of l, filled and committed in
// active snapshot key (once below returns: see fill), unless it exists
// already. Calls for one layer at once share one fill; one that prefill
// run by makes is recorded as its until the run is released.
func (s *Snapshotter) ensure(ctx context.Context, key string, l fillable, opts []snapshots.Opt, by *prefillRun, below func() error) error {
	for try := 1; ; try++ {
		ch := s.fills.DoChan(l.name(), func() (any, error) {
			if found, err := s.committed(ctx, l); err != nil || found {
				return nil, err
			}
			if err := s.fill(ctx, key, l, opts, below); err != nil {
				if by != nil {
					err = prefillFailed{err}
				}
				return nil, err
			}
			if by != nil {
				s.mu.Lock()
				s.prefilled[l.name()] = &prefilledLayer{by: by}
				by.made = append(by.made, l.name())
				s.mu.Unlock()
			}
			return nil, nil
		})
		var res singleflight.Result
		if by != nil {
			// Waited for even once the run is stopped, so that its
			// release finds what it made: the fill (under the run's
			// context) ends soon after.
			res = <-ch
		} else {
			select {
			case res = <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if by == nil && res.Err != nil && try < 3 && ctx.Err() == nil && (errors.As(res.Err, new(prefillFailed)) ||
			res.Shared && (errors.Is(res.Err, context.Canceled) || errors.Is(res.Err, context.DeadlineExceeded))) {
			// A prefill's failure, or that of a Prepare that gave up,
			// is not this Prepare's: it fills for itself.
			continue
		}
		return res.Err
	}
}

// prefillFailed is why a prefill could not fill a layer: containerd's
// collector may remove its active snapshot, which it does not know, and
// the run may be stopped.
type prefillFailed struct{ err error }

func (e prefillFailed) Error() string { return "prefilling: " + e.err.Error() }
func (e prefillFailed) Unwrap() error { return e.err }

// fill makes the committed snapshot of l: prepared as key without a
// parent, filled by the Filler, and committed under its name onto its
// parent once below returns (rebased: the overlay snapshotter commits an
// active snapshot made without a parent onto the one named at commit; a
// filled layer holds no whiteout that a parent would have needed). So a
// prefill fills the layers of an image beside each other and commits them
// bottom first; a Prepare's parent is committed already (parentCommitted).
func (s *Snapshotter) fill(ctx context.Context, key string, l fillable, opts []snapshots.Opt, below func() error) error {
	mounts, err := s.Snapshotter.Prepare(ctx, key, "", opts...)
	if err != nil {
		return err
	}
	dir, _, _ := snapmount.Writable(mounts)
	if dir == "" {
		snapmount.Discard(ctx, s, key, mounts)
		return fmt.Errorf("no writable directory in mounts %+v: %w", mounts, errdefs.ErrInternal)
	}
	got, err := s.filler.Fill(ctx, key, dir, l.labels)
	if err == nil {
		err = below()
	}
	if err != nil {
		snapmount.Discard(ctx, s, key, mounts)
		return err
	}
	labels := maps.Clone(l.labels)
	maps.Copy(labels, got)
	commitOpts := []snapshots.Opt{snapshots.WithLabels(labels)}
	if l.parent != "" {
		commitOpts = append(commitOpts, snapshots.WithParent(l.parent))
	}
	if err := s.Snapshotter.Commit(ctx, l.name(), key, commitOpts...); err != nil {
		_ = s.Remove(context.WithoutCancel(ctx), key)
		if !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("commit %s: %w", l.name(), err)
		}
		// Made meanwhile by a Prepare of another daemon's life: as good.
	}
	return nil
}

// parentCommitted is what a Prepare's fill waits for: nothing, since
// containerd prepares a layer once the one below is committed.
func parentCommitted() error { return nil }

// answer reports whether the committed snapshot of l is there for a
// Prepare to be answered with, and if a prefill made it, marks it taken so
// that releasing the prefill leaves it: containerd adopts it once the
// Prepare returns. Under mu, under which a release removes what it made.
func (s *Snapshotter) answer(ctx context.Context, l fillable) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.prefilled[l.name()]; p != nil {
		p.taken = true
		return true, nil
	}
	return s.committed(ctx, l)
}

// Prefill makes the snapshots of an image's layers (bottom first, with
// their diff IDs), those the Filler fills, in the background and in
// order, as the Prepares of containerd's unpacker would make them one at
// a time: each of those then finds its layer made, or waits for it, and
// containerd's round trips and metadata writes for one layer overlap the
// making of the next. It stops at the first layer the Filler does not
// fill (containerd names the snapshot of one it unpacks) or that fails
// (its Prepare fails it again, and says why). release, once the image is
// unpacked or failed to be, stops it and removes the snapshots it made
// that no Prepare was answered with.
func (s *Snapshotter) Prefill(ctx context.Context, layers []ocispec.Descriptor, diffIDs []digest.Digest) (release func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	run := &prefillRun{}
	go func() {
		defer close(done)
		s.prefillChain(ctx, run, layers, diffIDs)
	}()
	return func() {
		cancel()
		<-done
		// Under mu until all are removed, as a Prepare that finds one of
		// them (answer) either marks it taken first or finds it gone.
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, name := range slices.Backward(run.made) { // children first
			l := s.prefilled[name]
			if l == nil || l.by != run {
				continue // collected by containerd already
			}
			delete(s.prefilled, name)
			if !l.taken {
				if err := s.remove(context.WithoutCancel(ctx), name); err != nil {
					log.G(ctx).WithError(err).WithField("snapshot", name).Warn("removing a prefilled layer that nothing took")
				}
			}
		}
	}
}

// prefillRun is one Prefill.
type prefillRun struct {
	made []string // the layers it made, bottom first (under mu)
}

// prefilledLayer is a layer a prefill run made, until it is released.
type prefilledLayer struct {
	by    *prefillRun
	taken bool // a Prepare was answered with it: containerd has it
}

// labelParentChainID is how containerd's unpacker labels the Prepare of a
// layer with the chain below it.
const labelParentChainID = "containerd.io/snapshot/parent-chain-id"

// prefillFills bounds the layers a prefill fills at once (each waits for
// the one below to be committed before it is committed itself): enough
// that the symlink layer, the slowest to write and the last, starts early,
// and that filling keeps ahead of containerd's metadata writes.
const prefillFills = 8

// prefillChain makes the layers of Prefill run: filled beside each other,
// committed bottom first. The first layer that is not the Filler's or
// that fails ends it: those above it are stopped and discarded, those
// below are made (each layer's context is the one below's, stopped by its
// own failure).
func (s *Snapshotter) prefillChain(ctx context.Context, run *prefillRun, layers []ocispec.Descriptor, diffIDs []digest.Digest) {
	if len(layers) != len(diffIDs) {
		return
	}
	g := new(errgroup.Group)
	g.SetLimit(prefillFills) // started bottom first: the lowest running layer waits for none
	below := parentCommitted
	parent := ""
	for i, desc := range layers {
		if ctx.Err() != nil {
			break // a layer below failed, or the run was released
		}
		// As the unpacker labels its Prepare of the layer.
		target := identity.ChainID(diffIDs[:i+1]).String()
		labels := snapshots.FilterInheritedLabels(desc.Annotations)
		if labels == nil {
			labels = map[string]string{}
		}
		delete(labels, snapshots.LabelSnapshotUIDMapping)
		delete(labels, snapshots.LabelSnapshotGIDMapping)
		labels[snapshots.LabelSnapshotRef] = target
		labels[snapshots.LabelSnapshotDiffID] = diffIDs[i].String()
		if i > 0 {
			labels[labelParentChainID] = identity.ChainID(diffIDs[:i]).String()
		}
		// (A Filler that counts the layers it refuses counts this one
		// twice: the daemon prefills only images it built, which it
		// does not refuse.)
		if fills, err := s.filler.Fills(ctx, labels); err != nil || !fills {
			break
		}
		key := fmt.Sprintf("prefill-%d-%s", time.Now().UnixNano(), target)
		l := fillable{target: target, parent: parent, labels: labels}
		var stop context.CancelFunc
		ctx, stop = context.WithCancel(ctx)
		defer stop()
		committed := make(chan error, 1)
		waitBelow := below
		layerCtx := ctx
		g.Go(func() error {
			err := s.ensure(layerCtx, key, l, []snapshots.Opt{snapshots.WithLabels(labels)}, run, waitBelow)
			if err != nil {
				if layerCtx.Err() == nil && !errors.Is(err, errBelowUnfilled) {
					log.G(layerCtx).WithError(err).WithField("target", target).Debug("prefilling a layer: its Prepare makes it")
				}
				stop() // nothing above it can be committed
				err = errBelowUnfilled
			}
			committed <- err
			return nil
		})
		below = sync.OnceValue(func() error { return <-committed })
		parent = l.name()
	}
	_ = g.Wait()
}

// errBelowUnfilled stops the prefill of a layer whose layer below was not
// prefilled.
var errBelowUnfilled = fmt.Errorf("the layer below was not prefilled: %w", errdefs.ErrAborted)

// committed reports whether the committed snapshot of l exists: looked
// up by its name, which says what it holds, and not by a walk through
// every snapshot (containerd walks them itself), which would make each
// layer cost more the more images a node holds. (A snapshot of the same
// layer that containerd unpacked from its blob, when this node did not
// trust it, is not found: the layer is filled again, once.)
func (s *Snapshotter) committed(ctx context.Context, l fillable) (bool, error) {
	info, err := s.Snapshotter.Stat(ctx, l.name())
	if errdefs.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if info.Kind != snapshots.KindCommitted || info.Parent != l.parent || info.Labels[snapshots.LabelSnapshotRef] != l.target {
		return false, fmt.Errorf("snapshot %s is not layer %s on %q: %w", l.name(), l.target, l.parent, errdefs.ErrFailedPrecondition)
	}
	return true, nil
}

// Remove implements snapshots.Snapshotter; the filler then releases what
// it held for the snapshot.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	s.mu.Lock()
	delete(s.prefilled, key) // collected by containerd before anything took it
	s.mu.Unlock()
	return s.remove(ctx, key)
}

// remove is Remove, of a snapshot that no prefill holds as its own.
func (s *Snapshotter) remove(ctx context.Context, key string) error {
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
