// Package plugin is everything containerd-facing: it provisions images built
// from Nix packages into containerd.
package plugin

import (
	"context"
	"fmt"
	"io"
	"maps"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/layering"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// DefaultMaxLayers is the most layers an image gets, the symlink layer included.
const DefaultMaxLayers = layering.DefaultBudget + 1

// leaseExpiry bounds how long content of a provisioning that died halfway
// stays in containerd before its garbage collector takes it.
const leaseExpiry = 24 * time.Hour

// Provisioner turns image references into images in containerd.
type Provisioner struct {
	client      *containerd.Client
	builder     *nixbuild.Builder
	host        string
	maxLayers   int
	snapshotter string
	nixSnapshot string
	layerBlobs  bool
	progress    io.Writer
}

// ProvisionerOpt configures a Provisioner.
type ProvisionerOpt func(*Provisioner)

// WithHost sets the registry host of references (default nix.local).
func WithHost(host string) ProvisionerOpt { return func(p *Provisioner) { p.host = host } }

// WithMaxLayers bounds the layers of an image, the symlink layer included.
func WithMaxLayers(n int) ProvisionerOpt { return func(p *Provisioner) { p.maxLayers = n } }

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

// WithProgress writes one line per step for a person to read.
func WithProgress(w io.Writer) ProvisionerOpt { return func(p *Provisioner) { p.progress = w } }

// NewProvisioner returns a Provisioner that builds with builder and
// registers images through client (whose namespace comes from the context).
func NewProvisioner(client *containerd.Client, builder *nixbuild.Builder, opts ...ProvisionerOpt) *Provisioner {
	p := &Provisioner{client: client, builder: builder, host: resolver.DefaultHost, maxLayers: DefaultMaxLayers, nixSnapshot: "nix"}
	for _, opt := range opts {
		opt(p)
	}
	return p
}

func (p *Provisioner) say(format string, args ...any) {
	if p.progress != nil {
		fmt.Fprintf(p.progress, format+"\n", args...)
	}
}

// Provision builds the image for ref and registers and unpacks it in
// containerd. It either succeeds or leaves no image record and no content
// behind that was not there before.
func (p *Provisioner) Provision(ctx context.Context, ref string) (_ images.Image, retErr error) {
	start := time.Now()
	if p.maxLayers < 2 {
		return images.Image{}, fmt.Errorf("max layers %d: need at least 2 (store paths and symlinks): %w", p.maxLayers, errdefs.ErrInvalidArgument)
	}
	img, err := resolver.Parse(ref, resolver.WithHost(p.host))
	if err != nil {
		return images.Image{}, err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("ref", img.Ref()))
	p.say("%s: packages %v for %s", img.Ref(), img.Packages, img.Platform.NixSystem)

	res, err := p.builder.Build(ctx, nixbuild.Request{Packages: img.Packages, System: img.Platform.NixSystem, Tag: img.Tag})
	if err != nil {
		return images.Image{}, fmt.Errorf("build %s: %w", img.Ref(), err)
	}
	defer res.Release()
	var roots []string
	var closureSize int64
	for _, pkg := range res.Packages {
		roots = append(roots, pkg.Out)
	}
	for _, sp := range res.Closure {
		closureSize += sp.NarSize
	}
	groups, err := layering.Group(roots, res.Closure, layering.WithBudget(p.maxLayers-1))
	if err != nil {
		return images.Image{}, fmt.Errorf("group layers of %s: %w", img.Ref(), err)
	}
	p.say("%s: closure of %d store paths, %s, in %d layers + symlinks (built in %s)",
		img.Ref(), len(res.Closure), humanBytes(closureSize), len(groups), time.Since(start).Round(time.Millisecond))

	ls := p.client.LeasesService()
	lease, err := ls.Create(ctx, leases.WithRandomID(), leases.WithExpiration(leaseExpiry))
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

	snapshotter, err := p.resolveSnapshotter(ctx)
	if err != nil {
		return images.Image{}, err
	}
	byReference := snapshotter == p.nixSnapshot && !p.layerBlobs
	blobs, err := p.writeLayers(ctx, img, res, groups, byReference)
	if err != nil {
		return images.Image{}, err
	}

	// Register and unpack through the client's Pull with a resolver that
	// knows only this image: containerd's machinery then writes manifest
	// and config with their GC labels, unpacks with the remote-snapshotter
	// labels the `nix` snapshotter reads, and creates or updates the record.
	// The layers are in the content store already, so nothing is copied.
	p.say("%s: registering and unpacking", img.Ref())
	fixed := resolver.NewFixed(img.Ref(), blobs.manifest, blobs.blobs, p.client.ContentStore())
	pullOpts := []containerd.RemoteOpt{
		containerd.WithResolver(fixed),
		containerd.WithPullUnpack,
		containerd.WithPlatformMatcher(platforms.Only(ocispec.Platform{OS: img.Platform.OS, Architecture: img.Platform.Architecture})),
		containerd.WithPullSnapshotter(snapshotter),
	}
	names := []string{img.Ref()}
	if img.Tag == resolver.DefaultTag {
		// ctr and other clients look names up as typed: `ctr run
		// nix.local/shell/htop` needs a record without the tag.
		names = append(names, img.Name)
	}
	for _, name := range names {
		if _, gerr := p.client.ImageService().Get(ctx, name); errdefs.IsNotFound(gerr) {
			created = append(created, name)
		}
	}
	pulled, err := p.client.Pull(ctx, img.Ref(), pullOpts...)
	if err != nil {
		return images.Image{}, fmt.Errorf("register %s: %w", img.Ref(), err)
	}
	record := pulled.Metadata()
	for _, name := range names[1:] {
		alias := images.Image{Name: name, Target: record.Target, Labels: record.Labels}
		if err = putImage(ctx, p.client.ImageService(), alias); err != nil {
			return images.Image{}, fmt.Errorf("register %s: %w", name, err)
		}
	}
	p.say("%s: done in %s", img.Ref(), time.Since(start).Round(time.Millisecond))
	return record, nil
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

// writeLayers writes the image's layers and returns its manifest and
// config. Store-path layers are tar streams into the content store, or,
// for the nix snapshotter, small references that name the store paths:
// that snapshotter makes the layer from the store itself, so no byte of
// the closure is read to describe it.
func (p *Provisioner) writeLayers(ctx context.Context, img resolver.Image, res *nixbuild.Result, groups []layering.Layer, byReference bool) (imageBlobs, error) {
	cs := p.client.ContentStore()
	var descs []ocispec.Descriptor
	references := map[digest.Digest][]byte{}
	for i, g := range groups {
		paths := g.Paths
		var desc ocispec.Descriptor
		var err error
		if byReference {
			var blob []byte
			desc, blob, err = referenceLayer(paths)
			references[desc.Digest] = blob
		} else {
			desc, err = writeLayer(ctx, cs, ingestRef("layer", paths), func(w io.Writer) error {
				return tarstream.WriteStorePaths(w, paths)
			})
		}
		if err != nil {
			return imageBlobs{}, fmt.Errorf("layer %d of %s: %w", i+1, img.Ref(), err)
		}
		desc.Annotations = snapshot.StorePathAnnotations(paths)
		descs = append(descs, desc)
		p.say("%s: layer %d/%d %s %s (%d store paths)", img.Ref(), i+1, len(groups)+1, desc.Digest.Encoded()[:12], humanBytes(desc.Size), len(paths))
	}
	var outs, names []string
	for _, pkg := range res.Packages {
		outs = append(outs, pkg.Out)
		names = append(names, pkg.Name)
	}
	desc, err := writeLayer(ctx, cs, ingestRef("symlinks", outs), func(w io.Writer) error {
		return tarstream.WriteSymlinkForest(w, outs)
	})
	if err != nil {
		return imageBlobs{}, fmt.Errorf("symlink layer of %s: %w", img.Ref(), err)
	}
	descs = append(descs, desc)
	p.say("%s: layer %d/%d %s %s (symlinks)", img.Ref(), len(descs), len(descs), desc.Digest.Encoded()[:12], humanBytes(desc.Size))
	blobs, err := newImageBlobs(img, names, descs)
	maps.Copy(blobs.blobs, references)
	return blobs, err
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
