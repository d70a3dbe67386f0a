// Package plugin builds images from Nix packages, registers and unpacks
// them in containerd, and serves the nix snapshotter (the distribution
// endpoint is plugin/registry).
package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
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
	builder     *Builder
	snapshotter string
	nixSnapshot string
	layerBlobs  bool
	daemon      *daemonClient
	workDir     string
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

// WithDaemon builds in the `serve` daemon whose endpoint's unix socket is
// socket, when it runs and serves the same package source.
func WithDaemon(socket string) ProvisionerOpt {
	return func(p *Provisioner) {
		if socket != "" {
			p.daemon = newDaemonClient(socket)
		}
	}
}

// NewProvisioner returns a Provisioner that builds with builder and
// registers images through client (whose namespace comes from the context).
func NewProvisioner(client *containerd.Client, builder *Builder, opts ...ProvisionerOpt) *Provisioner {
	p := &Provisioner{client: client, builder: builder, nixSnapshot: "nix"}
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
	if _, err := p.builder.Parse(ref); err != nil {
		return images.Image{}, err
	}
	snapshotter, err := p.resolveSnapshotter(ctx)
	if err != nil {
		return images.Image{}, err
	}

	ls := p.client.LeasesService()
	lease, err := createLease(ctx, p.client, p.workDir, p.builder.nix.Timeout()+leaseBackstop)
	if err != nil {
		return images.Image{}, fmt.Errorf("create lease: %w", err)
	}
	ctx = leases.WithLease(ctx, lease.ID)
	var created []string
	defer func() {
		cleanupCtx := context.WithoutCancel(ctx)
		opts := []leases.DeleteOpt{}
		if retErr != nil {
			for _, name := range created {
				_ = p.client.ImageService().Delete(cleanupCtx, name)
			}
			// Collect now what only this provisioning referenced.
			opts = append(opts, leases.SynchronousDelete)
		}
		if derr := ls.Delete(cleanupCtx, lease, opts...); derr != nil {
			log.G(ctx).WithError(derr).Warn("deleting lease")
		}
	}()

	describe := p.describer(ctx, snapshotter)
	img, fetcher, err := p.build(ctx, ref, describe)
	if err != nil {
		return images.Image{}, err
	}
	if sd, ok := describe.(*snapshotDescriber); ok {
		if err := sd.holdFound(ctx); err != nil {
			return images.Image{}, err
		}
	}

	// Register and unpack through the client's Pull with a resolver that
	// knows only this image: containerd's machinery then writes manifest
	// and config with their GC labels, unpacks with the remote-snapshotter
	// labels the `nix` snapshotter reads, and creates or updates the record.
	// The layers are unpacked or stored already, so nothing is copied.
	fixed := resolver.NewFixed(img.Ref(), img.Manifest, img.Blobs, fetcher)
	pullOpts := []containerd.RemoteOpt{
		containerd.WithResolver(fixed),
		containerd.WithPullUnpack,
		containerd.WithPlatformMatcher(platforms.Only(ocispec.Platform{OS: img.Platform.OS, Architecture: img.Platform.Architecture})),
		containerd.WithPullSnapshotter(snapshotter),
	}
	if p.layerBlobs {
		// Even where the snapshotter makes layers itself: the point of
		// full layers is to have them, for export or other snapshotters.
		pullOpts = append(pullOpts, containerd.WithUnpackOpts([]containerd.UnpackOpt{containerd.WithUnpackFetchAllContent()}))
	}
	ns, _ := namespaces.Namespace(ctx)
	names := []string{img.Ref()}
	switch {
	case ns == CRINamespace:
		// The records a CRI pull makes: by tag, by digest, by image ID.
		names = append(names, img.Name+"@"+img.Manifest.Digest.String(), img.Config.Digest.String())
		pullOpts = append(pullOpts, containerd.WithPullLabels(criLabels))
	case img.Tag == resolver.DefaultTag:
		// ctr and other clients look names up as typed: `ctr run
		// nix.local/shell/htop` needs a record without the tag.
		names = append(names, img.Name)
	}
	var records []images.Image
	for _, name := range names {
		rec, gerr := p.client.ImageService().Get(ctx, name)
		if errdefs.IsNotFound(gerr) {
			created = append(created, name)
		}
		records = append(records, rec)
	}
	record, current := records[0], p.current(ctx, records, img, snapshotter, ns == CRINamespace)
	if current {
		p.builder.say("%s: registered and unpacked into %s already", img.Ref(), snapshotter)
	} else {
		p.builder.say("%s: registering and unpacking into %s", img.Ref(), snapshotter)
		pulled, err := p.client.Pull(ctx, img.Ref(), pullOpts...)
		if err != nil {
			return images.Image{}, fmt.Errorf("register %s: %w", img.Ref(), err)
		}
		record = pulled.Metadata()
		for _, name := range names[1:] {
			alias := images.Image{Name: name, Target: record.Target, Labels: record.Labels}
			if err = putImage(ctx, p.client.ImageService(), alias); err != nil {
				return images.Image{}, fmt.Errorf("register %s: %w", name, err)
			}
		}
	}
	if ns == CRINamespace {
		if err := p.waitCRI(ctx, img.Ref()); err != nil {
			return images.Image{}, err
		}
	}
	p.builder.say("%s: done in %s", img.Ref(), time.Since(start).Round(time.Millisecond))
	return record, nil
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
		if rec.Target.Digest != img.Manifest.Digest {
			return false
		}
		for k, v := range criLabels {
			if cri && rec.Labels[k] != v {
				return false
			}
		}
	}
	cs := p.client.ContentStore()
	if _, err := cs.Info(ctx, img.Manifest.Digest); err != nil {
		return false
	}
	info, err := cs.Info(ctx, img.Config.Digest)
	if err != nil {
		return false
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(img.Blobs[img.Config.Digest], &cfg); err != nil {
		return false
	}
	top := identity.ChainID(cfg.RootFS.DiffIDs).String()
	if info.Labels["containerd.io/gc.ref.snapshot."+snapshotter] != top {
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
func (p *Provisioner) describer(ctx context.Context, snapshotter string) Describer {
	switch {
	case p.layerBlobs:
		return newContentDescriber(p.client.ContentStore(), p.builder.cache)
	case snapshotter == p.nixSnapshot:
		return referenceDescriber{next: hashDescriber{p.builder.cache}}
	default:
		return newSnapshotDescriber(ctx, p.client.SnapshotService(snapshotter), p.builder.claims, p.workDir)
	}
}

// build builds ref in the daemon, when one serves the same package source,
// so that every client of this node shares its builds; else here. Either
// way tar layers are streamed from the store here, straight to where
// describe stores them.
func (p *Provisioner) build(ctx context.Context, ref string, describe Describer) (*Image, remotes.Fetcher, error) {
	if p.daemon == nil || !p.daemon.serves(ctx, p.builder) {
		img, err := p.builder.Build(ctx, ref, describe)
		return img, resolver.ProviderFetcher{Provider: p.client.ContentStore()}, err
	}

	p.builder.say("%s: building in the daemon at %s", ref, p.daemon.socket)
	img, fetcher, err := p.fromDaemon(ctx, ref, describe)
	if errors.Is(err, errPathsGone) {
		// Store paths of an image the daemon had cached went since.
		log.G(ctx).WithError(err).Warn("building in the daemon again")
		img, fetcher, err = p.fromDaemon(ctx, ref, describe)
	}
	return img, fetcher, err
}

// errPathsGone says store paths the daemon described are gone.
var errPathsGone = errors.New("store paths gone since the daemon built the image")

// fromDaemon has the daemon build ref, and describes and stores its layers
// here.
func (p *Provisioner) fromDaemon(ctx context.Context, ref string, describe Describer) (*Image, remotes.Fetcher, error) {
	blobs, asBlobs := describe.(contentDescriber)
	_, references := describe.(referenceDescriber)
	// Blobs must match the daemon's descriptors, which it keeps; anything
	// else needs only the layers' store paths (and the daemon reads none).
	img, fetcher, err := p.daemon.build(ctx, ref, !asBlobs)
	if err != nil || references {
		// The nix snapshotter makes every layer from the store itself.
		return img, fetcher, err
	}
	// The daemon keeps the store paths of what it builds alive a while
	// after it answers; before the first is read here, they all become
	// roots of this process too. (A layer that is there already is not
	// read: a warm pull starts no Nix.)
	var held *nixbuild.Roots
	hold := sync.OnceValue(func() error {
		var err error
		held, err = p.builder.nix.Hold(ctx, img.Paths())
		if errdefs.IsNotFound(err) {
			err = fmt.Errorf("%w: %w", errPathsGone, err)
		}
		return err
	})
	defer func() {
		for _, l := range img.Layers {
			l.hold = nil // held no more
		}
		held.Release()
	}()
	var chain digest.Digest
	for i, l := range img.Layers {
		l.hold = hold
		if asBlobs {
			_, err = writeLayer(ctx, blobs.cs, l.Key(), l.WriteTar, &l.Desc)
		} else {
			err = describe.Describe(ctx, chain, l)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("layer %d of %s: %w", i+1, img.Ref(), err)
		}
		chain = chainID(chain, l.Desc.Digest)
		p.builder.say("%s: layer %d/%d %s %s", img.Ref(), i+1, len(img.Layers), l.Desc.Digest.Encoded()[:12], humanBytes(l.Desc.Size))
	}
	if asBlobs {
		return img, fetcher, nil
	}
	// The daemon's image had reference layers: the same image with tar
	// layers has their digests.
	var cfg ocispec.Image
	if err := json.Unmarshal(img.Blobs[img.Config.Digest], &cfg); err != nil {
		return nil, nil, fmt.Errorf("config of %s from the daemon: %w", img.Ref(), err)
	}
	if img, err = newImage(img.Image, cfg, img.Layers); err != nil {
		return nil, nil, err
	}
	return img, fetcher, p.builder.claim(img)
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
func putImage(ctx context.Context, is images.Store, img images.Image) error {
	for {
		if _, err := is.Create(ctx, img); !errdefs.IsAlreadyExists(err) {
			return err
		}
		if _, err := is.Update(ctx, img); !errdefs.IsNotFound(err) {
			return err
		}
		// Deleted in between: create it again.
	}
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
