package plugin

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
)

// StageTarget is a namespace of containerd, and the snapshotter in it,
// whose pulls through the distribution endpoint should find an image's
// layers unpacked already ("" snapshotter: the namespace's default).
type StageTarget struct {
	Namespace, Snapshotter string
}

// ParseStageTarget reads "namespace" or "namespace/snapshotter".
func ParseStageTarget(s string) (StageTarget, error) {
	ns, sn, _ := strings.Cut(s, "/")
	if err := identifiers.Validate(ns); err != nil {
		return StageTarget{}, fmt.Errorf("unpack target %q: %w", s, err)
	}
	return StageTarget{Namespace: ns, Snapshotter: sn}, nil
}

func (t StageTarget) String() string {
	if t.Snapshotter == "" {
		return t.Namespace
	}
	return t.Namespace + "/" + t.Snapshotter
}

// StageKeep is how long staged snapshots are kept for the pull that is to
// find them, by a lease of their own; the pulled image keeps them after.
const StageKeep = 10 * time.Minute

// Staged remembers which snapshot chains were unpacked into which
// targets, for half of StageKeep: a request for an image staged already
// (kubelet asks on every pod start for :latest) costs containerd nothing.
// The zero Staged is ready to use.
type Staged struct {
	mu sync.Mutex
	at map[string]time.Time // by target and chain ID
}

func stagedKey(t StageTarget, chain digest.Digest) string { return t.String() + " " + chain.String() }

// recent says whether chain was staged into t not long ago: its lease
// holds it for half of StageKeep still, at least.
func (r *Staged) recent(t StageTarget, chain digest.Digest) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	at, ok := r.at[stagedKey(t, chain)]
	return ok && time.Since(at) < StageKeep/2
}

// add remembers that chains were staged into t, at once forgetting those
// staged too long ago.
func (r *Staged) add(t StageTarget, chains []digest.Digest) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.at == nil {
		r.at = map[string]time.Time{}
	}
	now := time.Now()
	for k, at := range r.at {
		if now.Sub(at) >= StageKeep/2 {
			delete(r.at, k)
		}
	}
	for _, c := range chains {
		r.at[stagedKey(t, c)] = now
	}
}

// Stager returns a Describer for the images the distribution endpoint
// serves: their layers are described by digest, as the endpoint's always
// are (from the cache, or hashed once), and on the way unpacked into the
// snapshots of targets (linked to the store where they can be), so that
// containerd's pull of the image in a target — CRI's, through the
// endpoint — finds every layer's snapshot and fetches no layer blob.
// Layers staged recently (staged) are not staged again. Staging never
// fails a request: a target that fails is dropped for the image with a
// warning (its pull fetches the layers), and counted.
func (p *Provisioner) Stager(targets []StageTarget, staged *Staged) layer.Describer {
	st := &stager{p: p, digests: p.builder.DigestDescriber(), recent: staged}
	for _, t := range targets {
		st.staging = append(st.staging, &staging{target: t})
	}
	return st
}

type stager struct {
	p       *Provisioner
	digests layer.Describer
	recent  *Staged
	staging []*staging
}

// staging is the unpacking into one target, begun at the first layer that
// is not staged already.
type staging struct {
	target   StageTarget
	ctx      context.Context // the target's namespace and lease
	lease    leases.Lease
	describe layer.Describer
	chains   []digest.Digest // staged by this request
	failed   bool
}

// Key implements layer.Describer: requests staging into the same targets
// share the work, which the targets' leases hold, not a caller's.
func (s *stager) Key() layer.DescriberKey {
	names := make([]string, len(s.staging))
	for i, st := range s.staging {
		names[i] = st.target.String()
	}
	d := s.digests.Key()
	return layer.DescriberKey{Kind: "staged/2:" + strings.Join(names, ",") + "+" + d.Kind, Layers: d.Layers}
}

// Ahead implements layer.Describer: the layers' digests come first.
func (s *stager) Ahead(ctx context.Context, layers []*layer.Layer) func() {
	return s.digests.Ahead(ctx, layers)
}

func (s *stager) Describe(ctx context.Context, parent digest.Digest, l *layer.Layer) error {
	if err := s.digests.Describe(ctx, parent, l); err != nil {
		return err
	}
	chain := layer.ChainID(parent, l.Desc.Digest)
	for _, st := range s.staging {
		if st.failed || (st.describe == nil && s.recent.recent(st.target, chain)) {
			continue
		}
		if st.describe == nil && !s.begin(ctx, st) {
			continue
		}
		// The same tar: the same descriptor, which the cache now holds.
		staged := *l
		if err := st.describe.Describe(st.ctx, parent, &staged); err != nil {
			s.fail(ctx, st, err)
			continue
		}
		st.chains = append(st.chains, chain)
	}
	return nil
}

// Finish implements layer.Describer: each target holds what it found, and
// what it staged is remembered.
func (s *stager) Finish(ctx context.Context) error {
	for _, st := range s.staging {
		if st.failed || st.describe == nil {
			continue
		}
		if err := st.describe.Finish(st.ctx); err != nil {
			s.fail(ctx, st, err)
			continue
		}
		s.recent.add(st.target, st.chains)
	}
	return nil
}

// begin makes the staging into st's target: a lease that expires, and the
// describer of its snapshots. False if the target needs none (the nix
// snapshotter makes every layer from the store itself) or it failed.
func (s *stager) begin(ctx context.Context, st *staging) bool {
	t := st.target
	nsCtx := namespaces.WithNamespace(ctx, t.Namespace)
	snapshotter := t.Snapshotter
	if snapshotter == "" {
		var err error
		if snapshotter, err = s.p.resolveSnapshotter(nsCtx); err != nil {
			s.fail(ctx, st, err)
			return false
		}
	}
	if snapshotter == s.p.nixSnapshot {
		st.failed = true // not a failure: nothing to do
		return false
	}
	lease, err := createLease(nsCtx, s.p.client, "", StageKeep)
	if err != nil {
		s.fail(ctx, st, fmt.Errorf("create lease: %w", err))
		return false
	}
	st.ctx, st.lease = leases.WithLease(nsCtx, lease.ID), lease
	st.describe = s.p.snapshots(st.ctx, snapshotter)
	return true
}

// StagingFailed says, and counts, that an image could not be staged at
// all (containerd cannot be reached): pulls through the endpoint fetch its
// layers.
func StagingFailed(ctx context.Context, err error) {
	stagingFailures.Inc()
	log.G(ctx).WithError(err).Warn("could not unpack the image for pulls through the endpoint ([registry] unpack_into): they fetch its layers")
}

// fail drops target st for this image, and what it unpacked.
func (s *stager) fail(ctx context.Context, st *staging, err error) {
	st.failed = true
	StagingFailed(log.WithLogger(ctx, log.G(ctx).WithField("target", st.target.String())), err)
	if st.describe != nil {
		_ = st.describe.Finish(st.ctx) // what it started is over before its lease goes
	}
	if st.lease.ID != "" {
		if err := s.p.client.LeasesService().Delete(context.WithoutCancel(st.ctx), st.lease, leases.SynchronousDelete); err != nil {
			log.G(ctx).WithError(err).Warn("deleting lease")
		}
	}
}
