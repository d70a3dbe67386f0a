package layer

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/snapmount"
)

// parallelFills bounds the layers filled at once by one describer
// (Rebased): enough to keep the snapshotter's round trips, the writing of
// the symlink layer and the hashing of the next layer all busy.
const parallelFills = 4

// unpacking is a layer being unpacked beside others (Rebased): into an
// active snapshot of its own, prepared without a parent, which is
// committed onto the chain below once that is.
type unpacking struct {
	cancel context.CancelFunc
	done   chan struct{} // closed once committed (or found committed) or failed
	err    error         // why it failed, once done
}

// filledSnapshot is an active snapshot that holds a layer, or why it does
// not (then it is discarded already).
type filledSnapshot struct {
	key    string
	mounts []mount.Mount
	// applied describes the tar applied, if it was not linked.
	applied ocispec.Descriptor
	err     error
}

// unpackRebased describes layer l and has it unpacked onto the chain
// parent, Rebased: it returns once the layer's descriptor is known (from
// the cache, or hashed here as the layer is written), and the layer is
// committed in the background, after the layer below. The first failure
// stops them all.
func (s *snapshotDescriber) unpackRebased(ctx context.Context, parent digest.Digest, l *Layer) (ocispec.Descriptor, error) {
	if err := s.unpackFailed(); err != nil {
		return ocispec.Descriptor{}, err
	}
	below := s.unpacking[parent] // nil where parent is committed already
	ctx, cancel := context.WithCancel(ctx)
	filled := make(chan filledSnapshot, 1)
	go func() { filled <- s.prepareFilled(ctx, l) }()
	desc, err := digestOf(ctx, s.cache, l)
	if err != nil {
		cancel()
		if f := <-filled; f.err == nil {
			snapmount.Discard(ctx, s.sn, f.key, f.mounts)
		}
		return ocispec.Descriptor{}, fmt.Errorf("pack layer %s: %w", l.Key(), err)
	}
	u := &unpacking{cancel: cancel, done: make(chan struct{})}
	s.unpacking[ChainID(parent, desc.Digest)] = u
	s.order = append(s.order, u)
	go func() {
		defer close(u.done)
		defer cancel()
		u.err = s.commitFilled(ctx, parent, below, l, desc, <-filled)
	}()
	return desc, nil
}

// prepareFilled prepares an active snapshot without a parent and writes
// layer l into it: linked, or its tar applied (see fill).
func (s *snapshotDescriber) prepareFilled(ctx context.Context, l *Layer) filledSnapshot {
	select {
	case s.fills <- struct{}{}:
		defer func() { <-s.fills }()
	case <-ctx.Done():
		return filledSnapshot{err: ctx.Err()}
	}
	key, err := unique(l.Key())
	if err != nil {
		return filledSnapshot{err: err}
	}
	mounts, err := s.sn.Prepare(ctx, key, "")
	if err != nil {
		return filledSnapshot{err: fmt.Errorf("prepare snapshot for layer %s: %w", l.Key(), err)}
	}
	f := filledSnapshot{key: key, mounts: mounts}
	if dir, w := s.linkable(ctx, mounts, l); w != nil {
		err = s.writeLinks(ctx, w, dir, l)
	} else {
		// Described (and hashed) apart: a tar applied here is read
		// twice, which only the symlink layer (small) and layers that
		// cannot be linked (copied anyway) are. The snapshot has no
		// parent, so no whiteout is converted: these tars hold none.
		f.applied, err = s.applyTar(ctx, mounts, l)
	}
	if err != nil {
		snapmount.Discard(ctx, s.sn, key, mounts)
		return filledSnapshot{err: err}
	}
	return f
}

// errBelowFailed stops a layer whose layer below could not be unpacked.
var errBelowFailed = fmt.Errorf("the layer below it was not unpacked: %w", errdefs.ErrAborted)

// commitFilled commits the filled snapshot f, of layer l described as
// desc, onto the chain parent once the layer below (if it is being
// unpacked) is committed.
func (s *snapshotDescriber) commitFilled(ctx context.Context, parent digest.Digest, below *unpacking, l *Layer, desc ocispec.Descriptor, f filledSnapshot) error {
	if f.err != nil {
		return f.err
	}
	committed := false
	defer func() {
		if !committed {
			snapmount.Discard(ctx, s.sn, f.key, f.mounts)
		}
	}()
	if f.applied.Digest != "" && (f.applied.Digest != desc.Digest || f.applied.Size != desc.Size) {
		// As containerd's unpacker checks what it applied. The cache
		// said otherwise than the bytes: it learns them for the next
		// pull.
		if err := s.cache.PutLayer(l.CacheKey(), f.applied); err != nil {
			log.G(ctx).WithError(err).Warn("correcting the layer cache")
		}
		return fmt.Errorf("layer %s applied as %s (%d bytes), described as %s (%d bytes): a stale layer record, corrected now: pull again: %w", l.Key(), f.applied.Digest, f.applied.Size, desc.Digest, desc.Size, errdefs.ErrFailedPrecondition)
	}
	if below != nil {
		select {
		case <-below.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if below.err != nil {
			return errBelowFailed
		}
	}
	var opts []snapshots.Opt
	if parent != "" {
		opts = append(opts, snapshots.WithParent(parent.String()))
	}
	var err error
	committed, err = s.commit(ctx, parent, f.key, l, desc, opts...)
	return err
}

// unpackFailed returns why the first layer that failed to unpack so far
// did, if one has.
func (s *snapshotDescriber) unpackFailed() error {
	for _, u := range s.order {
		select {
		case <-u.done:
			if u.err != nil {
				return u.err
			}
		default:
		}
	}
	return nil
}

// waitUnpacks waits for every layer being unpacked, and returns the first
// failure (after which the others are stopped).
func (s *snapshotDescriber) waitUnpacks() error {
	for _, u := range s.order {
		<-u.done
		if u.err != nil {
			return s.stopUnpacks(u.err)
		}
	}
	return nil
}

// stopUnpacks stops the layers still being unpacked, waits for them (each
// discards its snapshot unless it was committed), and returns err, the
// reason: the describer's work is over, whatever it had under way.
func (s *snapshotDescriber) stopUnpacks(err error) error {
	for _, u := range s.order {
		u.cancel()
	}
	for _, u := range s.order {
		<-u.done
	}
	s.order, s.unpacking = nil, map[digest.Digest]*unpacking{}
	return err
}
