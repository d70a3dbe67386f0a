package layer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/userns"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/pipelined"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/snapmount"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream/linked"
)

// snapshotDescriber unpacks tar layers straight from the Nix store into a
// snapshotter, describing them on the way, and stores no blob: what
// containerd's unpacker does with a blob, without the blob. Its snapshots
// carry the layer's identity and descriptor, so that the snapshot of a
// layer on a chain that has it already is found without a read.
//
// One describes the layers of one image, in order.
type snapshotDescriber struct {
	sn snapshots.Snapshotter
	// links writes store-path layers as links where the snapshotter's
	// layers are plain directories; cache knows the digests of layers
	// described before, which linking then need not read.
	links       *linked.Roots
	snapshotter string
	cache       *cache.Cache
	// claims are the layers this node made: a snapshot's labels are
	// believed only if they are one of them, since any image can carry them.
	claims *snapshot.Claims
	// workDir holds the temporary mounts of this process (snapmount.UseTempMounts).
	workDir string
	// labelled lists the snapshots that name their layer, by layer: read
	// once for all the layers of an image.
	labelled func() (map[string][]snapshots.Info, error)
	// found is the snapshot last found rather than made, not yet held.
	found *foundSnapshot
	scope string
	// mu guards the lists of labelled (which the commits of rebased
	// unpacks update).
	mu sync.Mutex
	// rebased unpacks layers at once (Rebased); unpacking are those under
	// way, by the chain each becomes, and in order.
	rebased   bool
	unpacking map[digest.Digest]*unpacking
	order     []*unpacking
	fills     chan struct{} // bounds the layers being filled at once
}

// Key implements Describer: the snapshots are held by the caller's lease.
func (s *snapshotDescriber) Key() DescriberKey {
	return DescriberKey{Kind: "snapshots/1", Layers: tarLayers, Scope: s.scope}
}

// foundSnapshot is layer l's snapshot chain, on parent.
type foundSnapshot struct {
	parent, chain digest.Digest
	l             *Layer
}

// SnapshotsOpt configures Snapshots.
type SnapshotsOpt func(*snapshotDescriber)

// Rebased says the snapshotter commits an active snapshot onto a parent
// named at Commit (snapshots.RebaseCap, which containerd's overlayfs
// has): each layer is then unpacked into a snapshot of its own, at once
// with the others, and committed onto the one below as soon as that is —
// as containerd's unpacker does there. Describe returns once the layer's
// descriptor is known; Finish waits for the commits.
func Rebased() SnapshotsOpt { return func(s *snapshotDescriber) { s.rebased = true } }

// Snapshots describes tar layers as it unpacks them into sn, the
// snapshotter named snapshotter, in the context's namespace and lease
// (snapshotDescriber): linked to the store through links where it can be.
// Temporary mounts go below workDir.
func Snapshots(ctx context.Context, sn snapshots.Snapshotter, snapshotter string, links *linked.Roots, c *cache.Cache, claims *snapshot.Claims, workDir string, opts ...SnapshotsOpt) Describer {
	return newSnapshotDescriber(ctx, sn, snapshotter, links, c, claims, workDir, opts...)
}

func newSnapshotDescriber(ctx context.Context, sn snapshots.Snapshotter, snapshotter string, links *linked.Roots, c *cache.Cache, claims *snapshot.Claims, workDir string, opts ...SnapshotsOpt) *snapshotDescriber {
	s := &snapshotDescriber{sn: sn, links: links, snapshotter: snapshotter, cache: c, claims: claims, workDir: workDir, scope: callerScope(), unpacking: map[digest.Digest]*unpacking{}, fills: make(chan struct{}, parallelFills), labelled: sync.OnceValues(func() (map[string][]snapshots.Info, error) {
		byLayer := map[string][]snapshots.Info{}
		err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted {
				byLayer[info.Labels[labels.Layer]] = append(byLayer[info.Labels[labels.Layer]], info)
			}
			return nil
		}, fmt.Sprintf("labels.%q", labels.Layer))
		return byLayer, err
	})}
	for _, opt := range opts {
		opt(s)
	}
	return s
}

// Annotations say what a layer holds and, for a tar layer described
// as desc, which layer it is: the layer's annotations in the manifest,
// which containerd's unpacker gives its snapshot as labels, and the
// labels of the snapshots this project unpacks itself. Both are claims
// this node records (snapshot.Claims).
func Annotations(l *Layer, desc ocispec.Descriptor) map[string]string {
	var annotations map[string]string
	if l.Symlinks {
		annotations = labels.SymlinkAnnotations(l.Paths)
		if u := l.User.Key(); u != "" {
			annotations[labels.UserLabel] = u
		}
	} else {
		annotations = labels.StorePathAnnotations(l.Paths)
	}
	if desc.MediaType == ocispec.MediaTypeImageLayer {
		annotations[labels.Layer] = l.Key()
		annotations[labels.LayerSize] = strconv.FormatInt(desc.Size, 10)
		annotations[labels.LayerDiffID] = desc.Digest.String()
	}
	return annotations
}

func (s *snapshotDescriber) Describe(ctx context.Context, parent digest.Digest, l *Layer) error {
	desc, err := s.describe(ctx, parent, l)
	if err != nil {
		// The image fails: so does what is under way for it.
		return s.stopUnpacks(err)
	}
	l.Desc = desc
	return nil
}

func (s *snapshotDescriber) describe(ctx context.Context, parent digest.Digest, l *Layer) (ocispec.Descriptor, error) {
	desc, ok, err := s.find(ctx, parent, l)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if ok {
		s.found = &foundSnapshot{parent: parent, chain: ChainID(parent, desc.Digest), l: l}
		return desc, nil
	}
	if s.found != nil && s.found.chain == parent {
		// Unpacked on top of, it must stay.
		if err := s.holdFound(ctx); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	s.found = nil
	if s.rebased {
		return s.unpackRebased(ctx, parent, l)
	}
	return s.unpack(ctx, parent, l)
}

// Ahead implements Describer: layers are hashed beside each other, but
// for those that, unpacked one by one, have their tar hashed as it is
// applied (the symlink layer; others where they cannot be linked, which
// are then read twice).
func (s *snapshotDescriber) Ahead(ctx context.Context, layers []*Layer) func() {
	if !s.rebased {
		layers = slices.DeleteFunc(slices.Clone(layers), func(l *Layer) bool { return l.Symlinks })
	}
	return hashAhead(ctx, s.cache, layers)
}

// Finish implements Describer: it waits for the layers still being
// unpacked (Rebased), and holds the snapshot last found.
func (s *snapshotDescriber) Finish(ctx context.Context) error {
	if err := s.waitUnpacks(); err != nil {
		s.found = nil // the image failed: nothing to hold
		return err
	}
	return s.holdFound(ctx)
}

// holdFound holds the snapshot last found, and with it the chain below:
// before the image is registered, and before a layer is unpacked on top of
// it. (Holding each snapshot found would cost containerd a metadata write
// per layer.)
func (s *snapshotDescriber) holdFound(ctx context.Context) error {
	f := s.found
	if f == nil {
		return nil
	}
	s.found = nil
	held, err := s.hold(ctx, f.parent, f.l, f.chain)
	if err == nil && !held {
		err = fmt.Errorf("snapshot %s of layer %s was removed as this pull found it: pull again: %w", f.chain, f.l.Key(), errdefs.ErrAborted)
	}
	return err
}

// find describes layer l from its snapshot on top of the chain parent, if
// there is one. The snapshot's labels were written with its content: they
// describe exactly what it holds.
func (s *snapshotDescriber) find(ctx context.Context, parent digest.Digest, l *Layer) (ocispec.Descriptor, bool, error) {
	labelled, err := s.labelled()
	if err != nil {
		return ocispec.Descriptor{}, false, fmt.Errorf("listing snapshots: %w", err)
	}
	s.mu.Lock()
	i := slices.IndexFunc(labelled[l.Key()], func(info snapshots.Info) bool { return info.Parent == parent.String() })
	var found snapshots.Info
	if i >= 0 {
		found = labelled[l.Key()][i]
	}
	s.mu.Unlock()
	if i < 0 {
		return ocispec.Descriptor{}, false, nil
	}
	if !s.claims.Made(found.Labels, found.Name) {
		// Labelled by an image this node did not make.
		log.G(ctx).WithField("snapshot", found.Name).Warn("snapshot claims to hold a layer of this node's, but this node never made it: unpacking the layer again")
		return ocispec.Descriptor{}, false, nil
	}
	d, derr := digest.Parse(found.Labels[labels.LayerDiffID])
	size, serr := strconv.ParseInt(found.Labels[labels.LayerSize], 10, 64)
	if derr != nil || serr != nil || ChainID(parent, d).String() != found.Name {
		log.G(ctx).WithField("snapshot", found.Name).Warn("snapshot labels do not describe it: unpacking the layer again")
		return ocispec.Descriptor{}, false, nil
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: d, Size: size}, true, nil
}

// hold puts the snapshot chain (of layer l on parent) under this pull's
// lease, as containerd's unpacker does with the snapshots it finds: another
// client that removes its image meanwhile cannot have it collected from
// under this one. False if it is gone already.
func (s *snapshotDescriber) hold(ctx context.Context, parent digest.Digest, l *Layer, chain digest.Digest) (bool, error) {
	key, err := unique(l.Key())
	if err != nil {
		return false, err
	}
	_, err = s.sn.Prepare(ctx, key, parent.String(), snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: chain.String()}))
	switch {
	case errdefs.IsAlreadyExists(err):
		return true, nil
	case err == nil:
		s.forget(l, chain)
		return false, s.sn.Remove(ctx, key)
	default:
		return false, fmt.Errorf("snapshot %s of layer %s: %w", chain, l.Key(), err)
	}
}

// remember lists a snapshot this describer committed, so that describing
// the image again (after a cached image turned out stale) finds it.
func (s *snapshotDescriber) remember(l *Layer, info snapshots.Info) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if labelled, err := s.labelled(); err == nil {
		labelled[l.Key()] = append(labelled[l.Key()], info)
	}
}

// forget unlists a snapshot found gone.
func (s *snapshotDescriber) forget(l *Layer, chain digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if labelled, err := s.labelled(); err == nil {
		labelled[l.Key()] = slices.DeleteFunc(labelled[l.Key()], func(info snapshots.Info) bool { return info.Name == chain.String() })
	}
}

// unique makes name unique with a random suffix.
func unique(name string) (string, error) {
	var suffix [6]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		return "", err
	}
	return name + "-" + hex.EncodeToString(suffix[:]), nil
}

// errUnpackStopped stops a layer's writer when unpacking it failed.
var errUnpackStopped = errors.New("unpacking stopped")

// unpack makes the snapshot of layer l on top of the chain parent, by
// applying its tar as it is written (in this process, which must be able
// to mount, as containerd's is), and commits it under its chain ID,
// labelled with what it holds.
func (s *snapshotDescriber) unpack(ctx context.Context, parent digest.Digest, l *Layer) (ocispec.Descriptor, error) {
	sn := s.sn
	key, err := unique(l.Key())
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	mounts, err := sn.Prepare(ctx, key, parent.String())
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("prepare snapshot for layer %s: %w", l.Key(), err)
	}
	committed := false
	defer func() {
		if !committed {
			snapmount.Discard(ctx, sn, key, mounts)
		}
	}()

	desc, err := s.fill(ctx, mounts, l)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	committed, err = s.commit(ctx, parent, key, l, desc)
	return desc, err
}

// commit commits active snapshot key, which holds layer l described as
// desc, onto the chain parent (which it was prepared on, or which it is
// rebased onto), labelled with what it holds. False where the chain was
// committed already, by another pull meanwhile: then it holds theirs, and
// key is the caller's to discard.
func (s *snapshotDescriber) commit(ctx context.Context, parent digest.Digest, key string, l *Layer, desc ocispec.Descriptor, opts ...snapshots.Opt) (bool, error) {
	chain := ChainID(parent, desc.Digest)
	labels := Annotations(l, desc)
	if err := s.claims.Record(labels, chain.String()); err != nil {
		return false, err
	}
	labels[snapshots.LabelSnapshotDiffID] = desc.Digest.String()
	err := s.sn.Commit(ctx, chain.String(), key, append(opts, snapshots.WithLabels(labels))...)
	if errdefs.IsAlreadyExists(err) {
		// Another pull committed the chain meanwhile: drop ours, hold
		// theirs.
		held, herr := s.hold(ctx, parent, l, chain)
		if herr == nil && !held {
			herr = fmt.Errorf("snapshot %s was removed as it was committed: %w", chain, errdefs.ErrAborted)
		}
		return false, herr
	}
	if err != nil {
		return false, fmt.Errorf("commit snapshot %s of layer %s: %w", chain, l.Key(), err)
	}
	s.remember(l, snapshots.Info{Kind: snapshots.KindCommitted, Name: chain.String(), Parent: parent.String(), Labels: labels})
	log.G(ctx).WithFields(log.Fields{"digest": desc.Digest, "size": desc.Size}).Debug("unpacked layer")
	return true, nil
}

// fill writes layer l into the active snapshot with mounts and describes
// it. A store-path layer whose snapshot is a plain directory on the
// store's filesystem (an overlay's upper directory, which becomes a lower
// one when committed, or a bind-mounted one) is written as links to the
// store: no file data is written, and none read where the cache knows the
// layer's digest. Any other layer has its tar applied.
func (s *snapshotDescriber) fill(ctx context.Context, mounts []mount.Mount, l *Layer) (ocispec.Descriptor, error) {
	if dir, w := s.linkable(ctx, mounts, l); w != nil {
		return s.link(ctx, w, dir, l)
	}
	desc, err := s.applyTar(ctx, mounts, l)
	if err == nil {
		packed(ctx, desc)
	}
	return desc, err
}

// linkable returns the directory of the active snapshot with mounts and
// the Writer that links layer l into it, if l is written so (see fill);
// else nil.
func (s *snapshotDescriber) linkable(ctx context.Context, mounts []mount.Mount, l *Layer) (string, *linked.Writer) {
	// In a user namespace the store's files belong to no one this process
	// may link as, and whiteouts cannot be made (applyTar).
	if dir, _, _ := snapmount.Writable(mounts); dir != "" && !l.Symlinks && !userns.RunningInUserNS() {
		if w := s.links.Writer(ctx, s.snapshotter, dir); w.Links() {
			return dir, w
		}
	}
	return "", nil
}

// link writes store-path layer l into dir as links and describes it
// (digestOf) as the links are made.
func (s *snapshotDescriber) link(ctx context.Context, w *linked.Writer, dir string, l *Layer) (ocispec.Descriptor, error) {
	if _, err := os.Stat(dir); err != nil {
		return ocispec.Descriptor{}, unwritable(l, err)
	}
	type described struct {
		desc ocispec.Descriptor
		err  error
	}
	hashed := make(chan described, 1)
	hashCtx, stopHash := context.WithCancel(ctx)
	defer stopHash()
	go func() {
		desc, err := digestOf(hashCtx, s.cache, l)
		hashed <- described{desc, err}
	}()
	if err := s.writeLinks(ctx, w, dir, l); err != nil {
		return ocispec.Descriptor{}, err
	}
	d := <-hashed
	if d.err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("pack layer %s: %w", l.Key(), d.err)
	}
	return d.desc, nil
}

// writeLinks writes store-path layer l into dir as links.
func (s *snapshotDescriber) writeLinks(ctx context.Context, w *linked.Writer, dir string, l *Layer) error {
	if err := w.Write(ctx, dir, l.Paths); err != nil {
		return fmt.Errorf("link layer %s: %w", l.Key(), err)
	}
	layersLinked.Inc()
	return nil
}

// unwritable says why layer l could not be written into its snapshot, and
// where that is because this process cannot reach the snapshot, how else
// to pull.
func unwritable(l *Layer, err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("unpack layer %s: %w (pull writes snapshots itself: it must run as root on containerd's host, or pass --with-layers for containerd to unpack)", l.Key(), err)
	}
	return fmt.Errorf("unpack layer %s: %w", l.Key(), err)
}

// applyTar applies layer l's tar, as it is written, onto the active
// snapshot with mounts, and describes it (the caller counts it packed, if
// that is how it is described).
func (s *snapshotDescriber) applyTar(ctx context.Context, mounts []mount.Mount, l *Layer) (ocispec.Descriptor, error) {
	// Packing (reading files, hashing) and applying (writing files) run
	// at once, a few chunks apart.
	pr, pw := io.Pipe()
	var m *tarstream.Measurer // set by the writer
	written := make(chan error, 1)
	go func() {
		chunks := pipelined.New(pw, 1<<20)
		m = tarstream.Measure(chunks)
		err := l.WriteTar(m)
		if cerr := chunks.Close(); err == nil {
			err = cerr
		}
		pw.CloseWithError(err)
		written <- err
	}()
	err := applyTarTo(ctx, mounts, pr, s.workDir)
	if err == nil {
		// Whatever the tar reader left (its end blocks).
		_, err = io.Copy(io.Discard, pr)
	}
	pr.CloseWithError(errUnpackStopped) // stops the writer, if it still writes
	if werr := <-written; werr != nil && !errors.Is(werr, errUnpackStopped) {
		// Reading the store failed (the applier saw it as a broken tar).
		return ocispec.Descriptor{}, fmt.Errorf("pack layer %s: %w", l.Key(), werr)
	}
	if err != nil {
		return ocispec.Descriptor{}, unwritable(l, err)
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: m.Digest(), Size: m.Size()}, nil
}

// applyTarTo unpacks a layer onto a snapshot's mounts as containerd's applier
// does (which is not exported): an overlay's upper directory, or the
// directory of a writable bind mount, is written directly; other mounts
// are mounted for the time it takes, where a process that dies leaves
// them to be unmounted by the next (snapmount.UseTempMounts).
func applyTarTo(ctx context.Context, mounts []mount.Mount, r io.Reader, workDir string) error {
	switch dir, lowers, overlay := snapmount.Writable(mounts); {
	case dir != "" && !overlay:
		_, err := archive.Apply(ctx, dir, r)
		return err
	case dir != "" && !userns.RunningInUserNS():
		// Whiteouts become overlay's character devices, which a user
		// namespace cannot make.
		_, err := archive.Apply(ctx, dir, r, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout), archive.WithParents(lowers))
		return err
	}
	if err := snapmount.UseTempMounts(workDir); err != nil {
		return fmt.Errorf("directory for temporary mounts: %w", err)
	}
	return mount.WithTempMount(ctx, mounts, func(root string) error {
		_, err := archive.Apply(ctx, root, r)
		if err != nil {
			snapmount.EmptyDir(root) // see snapmount.Discard
		}
		return err
	})
}
