package service

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/api"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// Pull builds the image of ref and registers it in the containerd of cfg,
// showing its progress to the progress sink of ctx: in the daemon, when
// one runs that builds what this process would, else here. It returns the
// image record's name and the manifest's digest.
func Pull(ctx context.Context, cfg plugin.Config, ref string) (name, dgst string, err error) {
	daemonRuns := false
	if cfg.API.Socket != "" {
		res, runs, err := pullInDaemon(ctx, cfg, ref)
		if err != nil {
			return "", "", err
		}
		if res != nil {
			return res.Name, res.Digest, nil
		}
		daemonRuns = runs
	}

	builder, err := cfg.Nix.Builder(nixbuild.WithWorkDir(cfg.WorkDir()))
	if err != nil {
		return "", "", err
	}
	defer builder.Close()
	client, err := cfg.Containerd.Connect(ctx)
	if err != nil {
		return "", "", err
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, cfg.Containerd.Namespace)

	// A running daemon holds the cache (it builds for us unless it builds
	// other images); another pull may, for as long as it runs.
	var layers *cache.Cache
	if daemonRuns {
		log.G(ctx).Warn("building without the cache, which the daemon holds: layers are read to be described")
	} else if layers, err = cache.Open(cfg.CacheDir(), 2*time.Second); err != nil {
		log.G(ctx).WithError(err).Warn("building without the cache: every layer is read again")
	}
	defer layers.Close()
	claims, err := cfg.Claims()
	if err != nil {
		return "", "", fmt.Errorf("%w (pull runs as root, as containerd does)", err)
	}
	pusher, err := cfg.Nix.Pusher(builder)
	if err != nil {
		return "", "", err
	}
	// The image is registered before its closure has reached the caches:
	// this process waits for that (an interrupt gives it up).
	defer pusher.Close(ctx)
	images, err := cfg.ImageBuilder(builder, plugin.WithCache(layers), plugin.WithClaims(claims), plugin.WithPusher(pusher))
	if err != nil {
		return "", "", err
	}
	p := plugin.NewProvisioner(client, images,
		plugin.WithSnapshotter(cfg.Containerd.Snapshotter),
		plugin.WithNixSnapshotter(cfg.Containerd.NixSnapshotter),
		plugin.WithLayerBlobs(cfg.Image.WithLayers),
		plugin.WithWorkDir(cfg.WorkDir()))
	img, err := p.Provision(ctx, ref)
	if err != nil {
		return "", "", err
	}
	return img.Name, img.Target.Digest.String(), nil
}

// pullInDaemon has the daemon on cfg's API socket build and register ref,
// when it runs and builds what this process would: so that every client
// of a node shares its builds. It returns no result and no error when
// this process is to build by itself, and whether a daemon runs.
func pullInDaemon(ctx context.Context, cfg plugin.Config, ref string) (*api.BuildResult, bool, error) {
	socket := cfg.API.Socket
	c, err := api.Dial(socket)
	switch {
	case errors.Is(err, api.ErrUntrusted):
		log.G(ctx).WithError(err).Warn("not building in the daemon: building here")
		return nil, false, nil
	case err != nil:
		log.G(ctx).WithError(err).Debug("no daemon to build in")
		return nil, false, nil
	}
	defer c.Close()
	ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
	info, err := c.Info(ictx)
	cancel()
	if err != nil {
		log.G(ctx).WithError(err).Debug("no daemon to build in")
		return nil, false, nil
	}
	src, err := cfg.Nix.Source()
	if err != nil {
		return nil, true, err
	}
	user, err := tarstream.ParseUser(cfg.Image.User)
	if err != nil {
		return nil, true, fmt.Errorf("[image] user: %w", err)
	}
	platforms, err := cfg.Image.ParsedPlatforms()
	if err != nil {
		return nil, true, err
	}
	if why := info.Differs(api.Info{PackageSource: src.String(), Host: cfg.Image.Host, User: user.Key(), Platforms: resolver.JoinPlatforms(platforms)}); why != "" {
		progress.Step(ctx, "%s: building here, not in the daemon on %s: %s", ref, socket, why)
		return nil, true, nil
	}
	progress.Step(ctx, "%s: building in the daemon on %s", ref, socket)
	res, err := c.Build(ctx, api.BuildRequest{Ref: ref, Namespace: cfg.Containerd.Namespace,
		Snapshotter: cfg.Containerd.Snapshotter, WithLayers: cfg.Image.WithLayers, Containerd: cfg.Containerd.Address})
	if err != nil {
		return nil, true, err
	}
	return &res, true, nil
}
