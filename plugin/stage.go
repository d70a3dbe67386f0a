package plugin

import (
	"context"
	"fmt"
	"strings"
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

// Stager returns a Describer for the images the distribution endpoint
// serves: their layers are described by digest, as the endpoint's always
// are, and on the way unpacked into the snapshots of targets (linked to
// the store where they can be), so that containerd's pull of the image in
// a target — CRI's, through the endpoint — finds every layer's snapshot and
// fetches no layer blob. Staging never fails a request: a target that
// fails is dropped for the image with a warning (its pull fetches the
// layers), and counted.
func (p *Provisioner) Stager(targets []StageTarget) layer.Describer {
	return &stager{p: p, digests: p.builder.DigestDescriber(), targets: targets}
}

type stager struct {
	p       *Provisioner
	digests layer.Describer
	targets []StageTarget
	staging []*staging // made at the first layer
	started bool
}

// staging is the unpacking into one target.
type staging struct {
	target   StageTarget
	ctx      context.Context // the target's namespace and lease
	lease    leases.Lease
	describe layer.Describer
	failed   bool
}

// Key implements layer.Describer: requests staging into the same targets
// share the work, which the targets' leases hold, not a caller's.
func (s *stager) Key() layer.DescriberKey {
	names := make([]string, len(s.targets))
	for i, t := range s.targets {
		names[i] = t.String()
	}
	d := s.digests.Key()
	return layer.DescriberKey{Kind: "staged/1:" + strings.Join(names, ",") + "+" + d.Kind, Layers: d.Layers}
}

func (s *stager) Describe(ctx context.Context, parent digest.Digest, l *layer.Layer) error {
	if !s.started {
		s.started = true
		s.start(ctx)
	}
	described := false
	for _, st := range s.staging {
		if st.failed {
			continue
		}
		if err := st.describe.Describe(st.ctx, parent, l); err != nil {
			s.fail(ctx, st, err)
			continue
		}
		described = true
	}
	if described {
		return nil // as the digests would: the same tar
	}
	return s.digests.Describe(ctx, parent, l)
}

// Finish implements layer.Describer: each target holds what it found.
func (s *stager) Finish(ctx context.Context) error {
	for _, st := range s.staging {
		if !st.failed {
			if err := st.describe.Finish(st.ctx); err != nil {
				s.fail(ctx, st, err)
			}
		}
	}
	return nil
}

// start makes the staging into each target that needs it: a lease that
// expires, and the describer of its snapshots.
func (s *stager) start(ctx context.Context) {
	for _, t := range s.targets {
		st := &staging{target: t, failed: true}
		s.staging = append(s.staging, st)
		nsCtx := namespaces.WithNamespace(ctx, t.Namespace)
		snapshotter := t.Snapshotter
		if snapshotter == "" {
			var err error
			if snapshotter, err = s.p.resolveSnapshotter(nsCtx); err != nil {
				s.fail(ctx, st, err)
				continue
			}
		}
		if snapshotter == s.p.nixSnapshot {
			continue // makes every layer from the store itself
		}
		lease, err := createLease(nsCtx, s.p.client, "", StageKeep)
		if err != nil {
			s.fail(ctx, st, fmt.Errorf("create lease: %w", err))
			continue
		}
		st.ctx, st.lease, st.failed = leases.WithLease(nsCtx, lease.ID), lease, false
		st.describe = layer.Snapshots(st.ctx, s.p.client.SnapshotService(snapshotter), snapshotter, &s.p.links, s.p.builder.cache, s.p.builder.claims, s.p.workDir)
	}
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
	if st.lease.ID != "" {
		if err := s.p.client.LeasesService().Delete(context.WithoutCancel(st.ctx), st.lease, leases.SynchronousDelete); err != nil {
			log.G(ctx).WithError(err).Warn("deleting lease")
		}
	}
}
