package service

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/images/archive"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
)

// built is an image of tar layers built in this process, for hosts without
// Nix: the bytes the endpoint serves. Its store paths are held until
// release.
type built struct {
	img     *plugin.Image
	release func()
}

// buildHere builds ref with cfg's package source in this process, with
// tar layers described by their digests (remembered in the cache, when
// this process can open it).
func buildHere(ctx context.Context, cfg plugin.Config, ref string) (_ *built, err error) {
	builder, err := cfg.Nix.Builder(nixbuild.WithWorkDir(cfg.WorkDir()))
	if err != nil {
		return nil, err
	}
	layers, err := cache.Open(cfg.CacheDir(), 2*time.Second)
	if err != nil {
		log.G(ctx).WithError(err).Warn("building without the cache: every layer is read to be described")
	}
	pusher, err := cfg.Nix.Pusher(builder)
	if err != nil {
		layers.Close()
		builder.Close()
		return nil, err
	}
	closeAll := func() {
		pusher.Close(ctx)
		layers.Close()
		builder.Close()
	}
	defer func() {
		if err != nil {
			closeAll()
		}
	}()
	images, err := cfg.ImageBuilder(builder, plugin.WithCache(layers), plugin.WithPusher(pusher))
	if err != nil {
		return nil, err
	}
	img, err := images.Build(ctx, ref, images.DigestDescriber())
	if err != nil {
		return nil, err
	}
	var paths []string
	for _, i := range img.Images() {
		paths = append(paths, i.Paths()...)
	}
	roots, err := builder.Hold(ctx, paths)
	if err != nil {
		return nil, fmt.Errorf("holding the store paths of %s: %w", img.Ref(), err)
	}
	return &built{img: img, release: func() { roots.Release(); closeAll() }}, nil
}

// Export builds ref and writes it to file as an OCI image layout archive
// (with docker's manifest.json too), which `ctr images import`, `podman
// load`, `docker load` and `skopeo copy oci-archive:` read; "-" writes to
// w. A failed export leaves no file.
func Export(ctx context.Context, cfg plugin.Config, ref, file string, w io.Writer) error {
	b, err := buildHere(ctx, cfg, ref)
	if err != nil {
		return err
	}
	defer b.release()
	opts := []archive.ExportOpt{archive.WithManifest(b.img.Target, b.img.Ref())}
	if b.img.Target.MediaType == ocispec.MediaTypeImageIndex {
		// Every platform's blobs, and docker's manifest.json naming the
		// node's image (docker load takes one).
		opts = append(opts, archive.WithAllPlatforms(),
			archive.WithPlatform(platforms.OnlyStrict(ocispec.Platform{OS: b.img.Platform.OS, Architecture: b.img.Platform.Architecture})))
	}
	if file == "-" {
		progress.Step(ctx, "%s: writing the archive to standard output", b.img.Ref())
		if err := archive.Export(ctx, b.img.Content(), layer.UntilDone(ctx, w), opts...); err != nil {
			return fmt.Errorf("export %s: %w", b.img.Ref(), err)
		}
		return nil
	}
	f, err := os.CreateTemp(filepath.Dir(file), "."+filepath.Base(file)+".*")
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	progress.Step(ctx, "%s: writing %s", b.img.Ref(), file)
	err = archive.Export(ctx, b.img.Content(), layer.UntilDone(ctx, f), opts...)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644) // as a file the user writes, not a temporary one
	}
	if err == nil {
		err = os.Rename(f.Name(), file)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("export %s to %s: %w", b.img.Ref(), file, err)
	}
	return nil
}

// PushOpts says how to reach a registry.
type PushOpts struct {
	// HostsDir holds containerd's hosts.toml files (certs.d).
	HostsDir string
	// PlainHTTP talks HTTP, not HTTPS, to the registry.
	PlainHTTP bool
}

// Push builds ref and pushes it to dest (a reference: host/name[:tag]) as
// containerd's pusher does, with credentials of docker's config.
func Push(ctx context.Context, cfg plugin.Config, ref, dest string, opts PushOpts) (string, error) {
	named, err := reference.ParseDockerRef(dest)
	if err != nil {
		return "", fmt.Errorf("push destination %q: %w: %w", dest, err, errdefs.ErrInvalidArgument)
	}
	b, err := buildHere(ctx, cfg, ref)
	if err != nil {
		return "", err
	}
	defer b.release()
	creds := dockerCredentials(ctx)
	hosts := config.HostOptions{Credentials: func(host string) (string, string, error) {
		user, secret, err := creds(host)
		if opts.PlainHTTP && secret != "" {
			log.G(ctx).WithField("host", host).Warn("sending registry credentials over plain HTTP (--plain-http): anyone on the path reads them")
		}
		return user, secret, err
	}}
	if opts.HostsDir != "" {
		hosts.HostDir = config.HostDirFromRoot(opts.HostsDir)
	}
	if opts.PlainHTTP {
		hosts.DefaultScheme = "http"
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, hosts)})
	// By digest, as containerd's client pushes: the tag is written once,
	// with the target, not with each manifest of an index on the way.
	pusher, err := resolver.Pusher(ctx, named.String()+"@"+b.img.Target.Digest.String())
	if err != nil {
		return "", fmt.Errorf("push to %s: %w", named, err)
	}
	progress.Step(ctx, "%s: pushing to %s", b.img.Ref(), named)
	var handler images.HandlerFunc = func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		progress.Step(ctx, "%s: pushed %s %s", b.img.Ref(), desc.Digest.Encoded()[:12], progress.Bytes(desc.Size))
		return nil, nil
	}
	wrap := func(h images.Handler) images.Handler { return images.Handlers(h, handler) }
	if err := remotes.PushContent(ctx, pusher, b.img.Target, b.img.Content(), nil, platforms.All, wrap); err != nil {
		return "", fmt.Errorf("push %s to %s: %w", b.img.Ref(), named, err)
	}
	return b.img.Target.Digest.String(), nil
}
