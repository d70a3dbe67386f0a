// Package plugin builds images from Nix packages (ImageBuilder), and
// registers and unpacks them in containerd (Provisioner). Below it are the
// parts it uses (plugin/cache, plugin/fixed, plugin/snapshot); above it
// those that serve it (plugin/registry, the distribution endpoint;
// plugin/service, the daemon and the CLI's pull).
package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/fixed"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream/linked"
)

// CRINamespace is where Kubernetes' CRI keeps its images.
const CRINamespace = "k8s.io"

// criLabels are what a CRI pull puts on its records, plus pinning, so that
// kubelet's image garbage collector leaves node-provisioned images alone.
var criLabels = map[string]string{
	"io.cri-containerd.image":  "managed",
	"io.cri-containerd.pinned": "pinned",
}

// criVisibleTimeout bounds the wait for CRI to see a registered image.
const criVisibleTimeout = 10 * time.Second

// Provisioner builds images and registers them in containerd.
type Provisioner struct {
	client      *containerd.Client
	builder     *ImageBuilder
	snapshotter string
	nixSnapshot string
	layerBlobs  bool
	workDir     string
	links       *linked.Roots
	prefiller   Prefiller
}

// Prefiller is the nix snapshotter in this process (a
// plugin/snapshot.Snapshotter), which can make an image's layers ahead of
// containerd's unpacker asking for them one at a time.
type Prefiller interface {
	// Prefill starts making the snapshots of layers (bottom first, with
	// their diff IDs); release, once they are unpacked or failed to be,
	// removes those that containerd did not take.
	Prefill(ctx context.Context, layers []ocispec.Descriptor, diffIDs []digest.Digest) (release func())
}

// ProvisionerOpt configures a Provisioner.
type ProvisionerOpt func(*Provisioner)

// WithSnapshotter unpacks images into the named snapshotter instead of the
// namespace's default.
func WithSnapshotter(name string) ProvisionerOpt {
	return func(p *Provisioner) { p.snapshotter = name }
}

// WithNixSnapshotter names the snapshotter that materialises store paths
// itself (default "nix"). Images unpacked into it get store-path reference
// layers instead of tar layers, unless WithLayerBlobs is set.
func WithNixSnapshotter(name string) ProvisionerOpt {
	return func(p *Provisioner) { p.nixSnapshot = name }
}

// WithLayerBlobs writes full tar layers whatever the snapshotter, so the
// image can be exported or unpacked anywhere.
func WithLayerBlobs(on bool) ProvisionerOpt { return func(p *Provisioner) { p.layerBlobs = on } }

// WithWorkDir keeps this process's working state (the owner of its
// leases, its temporary mounts) below dir, root's alone, where the next
// process cleans up after it if it dies.
func WithWorkDir(dir string) ProvisionerOpt { return func(p *Provisioner) { p.workDir = dir } }

// WithLinks writes layers linked to the store through links, which
// should live as long as the process: each of its Writers finds once how
// to link into a snapshotter's root.
func WithLinks(links *linked.Roots) ProvisionerOpt { return func(p *Provisioner) { p.links = links } }

// WithPrefiller has prefiller, the nix snapshotter that the containerd of
// the client reaches, make the layers of each image unpacked into it ahead
// of containerd's unpacker: its metadata writes for one layer then overlap
// the making of the next.
func WithPrefiller(prefiller Prefiller) ProvisionerOpt {
	return func(p *Provisioner) { p.prefiller = prefiller }
}

// NewProvisioner returns a Provisioner that builds with builder and
// registers images through client (whose namespace comes from the context).
func NewProvisioner(client *containerd.Client, builder *ImageBuilder, opts ...ProvisionerOpt) *Provisioner {
	p := &Provisioner{client: client, builder: builder, nixSnapshot: "nix", links: &linked.Roots{}}
	for _, opt := range opts {
		opt(p)
	}
	return p
}

// Provision builds the image for ref and registers and unpacks it in
// containerd. It either succeeds or leaves no image record and no content
// behind that was not there before.
func (p *Provisioner) Provision(ctx context.Context, ref string) (_ images.Image, retErr error) {
	start := time.Now()
	parsed, err := p.builder.Parse(ref)
	if err != nil {
		return images.Image{}, err
	}
	if err := p.builder.CheckPlatform(parsed); err != nil {
		return images.Image{}, err
	}
	snapshotter, err := p.resolveSnapshotter(ctx)
	if err != nil {
		return images.Image{}, err
	}
	ctx, done, err := p.lease(ctx)
	if err != nil {
		return images.Image{}, err
	}
	var created []string
	defer func() { done(retErr != nil, created) }()

	describe := p.describer(ctx, snapshotter)
	img, err := p.builder.Build(ctx, ref, describe)
	if err != nil {
		return images.Image{}, err
	}
	record, created, err := p.register(ctx, img, snapshotter)
	if err != nil {
		return images.Image{}, err
	}
	if ns, _ := namespaces.Namespace(ctx); ns == CRINamespace {
		if err := p.waitCRI(ctx, img.Ref()); err != nil {
			return images.Image{}, err
		}
	}
	progress.Step(ctx, "%s: done in %s", img.Ref(), time.Since(start).Round(time.Millisecond))
	return record, nil
}

// lease returns ctx under a new lease of this process, which done deletes:
// when the provisioning failed, synchronously, with the image records it
// created, so that what only it referenced is collected at once.
func (p *Provisioner) lease(ctx context.Context) (context.Context, func(failed bool, created []string), error) {
	lease, err := createLease(ctx, p.client, p.workDir, p.builder.nix.Timeout()+leaseBackstop)
	if err != nil {
		return nil, nil, fmt.Errorf("create lease: %w", err)
	}
	done := func(failed bool, created []string) {
		cleanupCtx := context.WithoutCancel(ctx)
		var opts []leases.DeleteOpt
		if failed {
			for _, name := range created {
				_ = p.client.ImageService().Delete(cleanupCtx, name)
			}
			opts = append(opts, leases.SynchronousDelete)
		}
		if err := p.client.LeasesService().Delete(cleanupCtx, lease, opts...); err != nil {
			log.G(ctx).WithError(err).Warn("deleting lease")
		}
	}
	return leases.WithLease(ctx, lease.ID), done, nil
}

// register registers img, its layers unpacked into snapshotter, under its
// names (recordNames), unless the records are current already. It returns
// the names it created records of, also when it fails.
//
// Where the layers' snapshots are all made already (unpacksItself) it
// writes the records itself; else it registers and unpacks through the
// client's Pull with a resolver that knows only this image: containerd's
// machinery then writes manifest and config with their GC labels, unpacks
// with the remote-snapshotter labels the `nix` snapshotter reads, and
// creates or updates the record. The layers are unpacked or stored
// already, so nothing is copied.
func (p *Provisioner) register(ctx context.Context, img *Image, snapshotter string) (images.Image, []string, error) {
	ns, _ := namespaces.Namespace(ctx)
	cri := ns == CRINamespace
	names := recordNames(img, cri)
	var records []images.Image
	var created []string
	for _, name := range names {
		rec, err := p.client.ImageService().Get(ctx, name)
		if errdefs.IsNotFound(err) {
			created = append(created, name)
		}
		records = append(records, rec)
	}
	if p.current(ctx, records, img, snapshotter, cri) {
		progress.Step(ctx, "%s: registered and unpacked into %s already", img.Ref(), snapshotter)
		return records[0], created, nil
	}

	var record images.Image
	var err error
	if p.unpacksItself(snapshotter) {
		progress.Step(ctx, "%s: registering in %s", img.Ref(), snapshotter)
		record, err = p.writeImage(ctx, img, snapshotter, names[0], cri)
	} else {
		progress.Step(ctx, "%s: registering and unpacking into %s", img.Ref(), snapshotter)
		record, err = p.pullRecord(ctx, img, snapshotter, cri)
	}
	if err != nil {
		return images.Image{}, created, fmt.Errorf("register %s: %w", img.Ref(), err)
	}
	for _, name := range names[1:] {
		alias := images.Image{Name: name, Target: record.Target, Labels: record.Labels}
		if _, err = putImage(ctx, p.client.ImageService(), alias); err != nil {
			return images.Image{}, created, fmt.Errorf("register %s: %w", name, err)
		}
	}
	return record, created, nil
}

// pullRecord registers img through the client's Pull, with a resolver
// that knows only this image and unpacking into snapshotter.
func (p *Provisioner) pullRecord(ctx context.Context, img *Image, snapshotter string, cri bool) (images.Image, error) {
	pullOpts := []containerd.RemoteOpt{
		containerd.WithResolver(fixed.New(img.Ref(), img.Target, img.Blobs, p.client.ContentStore())),
		containerd.WithPullUnpack,
		containerd.WithPlatformMatcher(platforms.Only(ocispec.Platform{OS: img.Platform.OS, Architecture: img.Platform.Architecture})),
		containerd.WithPullSnapshotter(snapshotter),
	}
	if p.layerBlobs {
		// Even where the snapshotter makes layers itself: the point of
		// full layers is to have them, for export or other snapshotters.
		pullOpts = append(pullOpts, containerd.WithUnpackOpts([]containerd.UnpackOpt{containerd.WithUnpackFetchAllContent()}))
	}
	if cri {
		pullOpts = append(pullOpts, containerd.WithPullLabels(criLabels))
	}
	if snapshotter == p.nixSnapshot && p.prefiller != nil {
		if layers, diffIDs, err := img.unpacked(); err == nil {
			defer p.prefiller.Prefill(ctx, layers, diffIDs)()
		}
	}
	pulled, err := p.pull(ctx, img.Ref(), snapshotter, pullOpts)
	if err != nil {
		return images.Image{}, err
	}
	return pulled.Metadata(), nil
}

// writeImage registers img, every layer of which has its snapshot in
// snapshotter already (layer.Snapshots made or found each, held by this
// provisioning's lease), under name, writing what containerd's Pull would:
// config and manifest with their GC labels (the config's naming the top
// snapshot, the manifest's its children) and the image record. Pull's
// unpacker would only find each snapshot again, at a round trip per layer.
func (p *Provisioner) writeImage(ctx context.Context, img *Image, snapshotter, name string, cri bool) (images.Image, error) {
	cs := p.client.ContentStore()
	if err := writeBlob(ctx, cs, img.Config, img.Blobs[img.Config.Digest], map[string]string{
		snapshotGCLabel(snapshotter): img.Chain().String(),
	}); err != nil {
		return images.Image{}, fmt.Errorf("write config: %w", err)
	}
	children := map[string]string{"containerd.io/gc.ref.content.config": img.Config.Digest.String()}
	for i, l := range img.Layers {
		// As Pull labels them, though their blobs are never stored.
		children[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", i)] = l.Desc.Digest.String()
	}
	if err := writeBlob(ctx, cs, img.Manifest, img.Blobs[img.Manifest.Digest], children); err != nil {
		return images.Image{}, fmt.Errorf("write manifest: %w", err)
	}
	if img.Target.Digest != img.Manifest.Digest {
		// An index: its other platforms' images are not this node's, and
		// are left out as containerd's pull for this platform leaves them.
		var index ocispec.Index
		if err := json.Unmarshal(img.Blobs[img.Target.Digest], &index); err != nil {
			return images.Image{}, fmt.Errorf("image index: %w", err)
		}
		children := map[string]string{}
		for i, m := range index.Manifests {
			children[fmt.Sprintf("containerd.io/gc.ref.content.m.%d", i)] = m.Digest.String()
		}
		if err := writeBlob(ctx, cs, img.Target, img.Blobs[img.Target.Digest], children); err != nil {
			return images.Image{}, fmt.Errorf("write image index: %w", err)
		}
	}
	record := images.Image{Name: name, Target: img.Target}
	if cri {
		record.Labels = criLabels
	}
	return putImage(ctx, p.client.ImageService(), record)
}

// snapshotGCLabel is the label by which an image config keeps its top
// snapshot in snapshotter from containerd's garbage collector.
func snapshotGCLabel(snapshotter string) string {
	return "containerd.io/gc.ref.snapshot." + snapshotter
}

// writeBlob stores blob, described by desc, under the context's lease
// (where it is stored already too, as containerd's content store does for
// a writer of it), and gives it labels: as it is committed, in the same
// synced write, or, if it was there already, after.
func writeBlob(ctx context.Context, cs content.Store, desc ocispec.Descriptor, blob []byte, labels map[string]string) error {
	if err := content.WriteBlob(ctx, cs, "nixery-"+desc.Digest.String(), bytes.NewReader(blob), desc, content.WithLabels(labels)); err != nil {
		return err
	}
	info, err := cs.Info(ctx, desc.Digest)
	if err != nil {
		return err
	}
	var fields []string
	for k, v := range labels {
		if info.Labels[k] != v {
			fields = append(fields, "labels."+k)
		}
	}
	if len(fields) == 0 {
		return nil
	}
	_, err = cs.Update(ctx, content.Info{Digest: desc.Digest, Labels: labels}, fields...)
	return err
}

// reachRetry bounds how long a registration waits for containerd to reach
// the snapshotter again: containerd redials a proxy snapshotter that
// restarted (the daemon's own, `nix`) with a backoff of up to 3 s, and
// fails every call to it meanwhile.
const reachRetry = 10 * time.Second

// pull is the client's Pull, tried again while containerd cannot reach
// the snapshotter.
func (p *Provisioner) pull(ctx context.Context, ref, snapshotter string, opts []containerd.RemoteOpt) (containerd.Image, error) {
	deadline := time.Now().Add(reachRetry)
	for {
		pulled, err := p.client.Pull(ctx, ref, opts...)
		if err == nil || !errdefs.IsUnavailable(err) || time.Now().After(deadline) {
			return pulled, err
		}
		registerRetries.Inc()
		log.G(ctx).WithError(err).Warn("containerd cannot reach the snapshotter: registering again")
		progress.Step(ctx, "%s: containerd cannot reach snapshotter %s yet (it redials one that restarted within seconds): trying again", ref, snapshotter)
		select {
		case <-time.After(500 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// recordNames are the names img is registered under, its reference first:
// for CRI those a CRI pull makes (by tag, by digest, by image ID); else,
// for the default tag, the name without it too, as ctr and other clients
// look names up as typed (`ctr run nix.local/shell/htop`).
func recordNames(img *Image, cri bool) []string {
	names := []string{img.Ref()}
	switch {
	case cri:
		names = append(names, img.Name+"@"+img.Target.Digest.String(), img.Config.Digest.String())
	case img.Tag == resolver.DefaultTag:
		names = append(names, img.Name)
	}
	return names
}

// current reports whether the image records are img already, unpacked into
// snapshotter and kept there by containerd's garbage collector: then there
// is nothing to register (which would cost containerd a metadata write per
// layer).
func (p *Provisioner) current(ctx context.Context, records []images.Image, img *Image, snapshotter string, cri bool) bool {
	if p.layerBlobs {
		return false // they may want writing
	}
	for _, rec := range records {
		if rec.Target.Digest != img.Target.Digest {
			return false
		}
		for k, v := range criLabels {
			if cri && rec.Labels[k] != v {
				return false
			}
		}
	}
	cs := p.client.ContentStore()
	for _, d := range []digest.Digest{img.Target.Digest, img.Manifest.Digest} {
		if _, err := cs.Info(ctx, d); err != nil {
			return false
		}
	}
	info, err := cs.Info(ctx, img.Config.Digest)
	if err != nil {
		return false
	}
	top := img.Chain().String()
	if info.Labels[snapshotGCLabel(snapshotter)] != top {
		return false
	}
	_, err = p.client.SnapshotService(snapshotter).Stat(ctx, top)
	return err == nil
}

// waitCRI returns once containerd's CRI reports ref, which it learns of
// from an event: only then will kubelet find it. Without CRI (the plugin
// is off) there is nothing to wait for.
func (p *Provisioner) waitCRI(ctx context.Context, ref string) error {
	conn, ok := p.client.Conn().(grpc.ClientConnInterface)
	if !ok {
		return fmt.Errorf("containerd client has no gRPC connection for CRI: %w", errdefs.ErrNotImplemented)
	}
	cri := runtime.NewImageServiceClient(conn)
	ctx, cancel := context.WithTimeout(ctx, criVisibleTimeout)
	defer cancel()
	for {
		status, err := cri.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: &runtime.ImageSpec{Image: ref}})
		switch {
		case status.GetImage() != nil:
			return nil
		case grpcstatus.Code(err) == codes.Unimplemented:
			log.G(ctx).Warn("containerd serves no CRI: not waiting for it to see the image")
			return nil
		case ctx.Err() != nil:
			return fmt.Errorf("registered %s, but containerd's CRI does not see it after %s: %w", ref, criVisibleTimeout, errdefs.ErrUnavailable)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// describer says how layers are described for snapshotter, storing them
// on the way: into snapshots, without blobs; as blobs when they are asked
// for; for the nix snapshotter, which makes every layer from the store
// itself, as references (and the symlink layer by its digest alone).
func (p *Provisioner) describer(ctx context.Context, snapshotter string) layer.Describer {
	switch {
	case p.unpacksItself(snapshotter):
		return p.snapshots(ctx, snapshotter)
	case p.layerBlobs:
		return layer.Content(p.client.ContentStore(), p.builder.cache)
	default:
		return layer.References(layer.Digests(p.builder.cache))
	}
}

// snapshots describes layers as it unpacks them into snapshotter, at once
// where containerd says the snapshotter can rebase (layer.Rebased).
func (p *Provisioner) snapshots(ctx context.Context, snapshotter string) layer.Describer {
	var opts []layer.SnapshotsOpt
	caps, err := p.client.GetSnapshotterCapabilities(ctx, snapshotter)
	switch {
	case err != nil:
		log.G(ctx).WithError(err).WithField("snapshotter", snapshotter).Debug("snapshotter capabilities unknown: unpacking layers one by one")
	case slices.Contains(caps, snapshots.RebaseCap):
		opts = append(opts, layer.Rebased())
	}
	return layer.Snapshots(ctx, p.client.SnapshotService(snapshotter), snapshotter, p.links, p.builder.cache, p.builder.claims, p.workDir, opts...)
}

// unpacksItself reports whether images for snapshotter have their layers
// unpacked into it by this process, as they are described, rather than by
// containerd's unpacker: unless full layer blobs are asked for, or the
// snapshotter is the nix one, which makes every layer from the store
// itself.
func (p *Provisioner) unpacksItself(snapshotter string) bool {
	return !p.layerBlobs && snapshotter != p.nixSnapshot
}

// resolveSnapshotter names the snapshotter images are unpacked into: the
// configured one, else the namespace's default, else the platform's.
func (p *Provisioner) resolveSnapshotter(ctx context.Context) (string, error) {
	if p.snapshotter != "" {
		return p.snapshotter, nil
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return "", err
	}
	labels, err := p.client.NamespaceService().Labels(ctx, ns)
	if errdefs.IsNotFound(err) {
		return defaults.DefaultSnapshotter, nil
	}
	if err != nil {
		return "", fmt.Errorf("namespace %s: %w", ns, err)
	}
	if name := labels[defaults.DefaultSnapshotterNSLabel]; name != "" {
		return name, nil
	}
	return defaults.DefaultSnapshotter, nil
}

// putImage creates an image record or updates the existing one.
func putImage(ctx context.Context, is images.Store, img images.Image) (images.Image, error) {
	for {
		if rec, err := is.Create(ctx, img); !errdefs.IsAlreadyExists(err) {
			return rec, err
		}
		if rec, err := is.Update(ctx, img); !errdefs.IsNotFound(err) {
			return rec, err
		}
		// Deleted in between: create it again.
	}
}
