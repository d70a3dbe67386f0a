package service

import (
	"context"
	"net"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sync/errgroup"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/api"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/registry"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
)

// Serve runs the node daemon of cfg until ctx ends: the nix snapshotter,
// the distribution endpoint, the API for the CLI and the metrics, the
// last three as configured.
func Serve(ctx context.Context, cfg plugin.Config) error {
	targets, err := cfg.Registry.StageTargets()
	if err != nil {
		return err
	}
	// Serving needs neither Nix nor containerd to be up, since the daemon
	// starts before both: Nix runs for requests only.
	builder, err := cfg.Nix.Builder(nixbuild.WithWorkDir(cfg.WorkDir()))
	if err != nil {
		return err
	}
	defer builder.Close()
	builder.Warm(ctx)
	claims, err := cfg.Claims()
	if err != nil {
		return err
	}
	sn, err := snapshot.New(cfg.Snapshotter.Root,
		snapshot.WithGCRootsDir(cfg.Snapshotter.GCRootsDir),
		snapshot.WithStore(builder),
		snapshot.WithClaims(claims),
		snapshot.WithTrustOtherImages(cfg.Snapshotter.TrustOtherImages))
	if err != nil {
		return err
	}
	defer sn.Close()
	log.G(ctx).WithField("root", cfg.Snapshotter.Root).Info("nix snapshotter ready")

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return snapshot.Serve(ctx, sn, cfg.Snapshotter.Address) })
	if cfg.Metrics.Address != "" {
		g.Go(func() error {
			return plugin.ServeMetrics(ctx, cfg.Metrics.Address, func() error {
				// Healthy while the snapshotter answers on its socket.
				c, err := net.DialTimeout("unix", cfg.Snapshotter.Address, time.Second)
				if err == nil {
					c.Close()
				}
				return err
			})
		})
	}
	if cfg.Registry.Address != "" || cfg.API.Socket != "" {
		// The endpoint and the CLI's builds share one builder and cache.
		layers, err := cache.Open(cfg.CacheDir(), 5*time.Second)
		if err != nil {
			return err
		}
		defer layers.Close()
		pusher, err := cfg.Nix.Pusher(builder)
		if err != nil {
			return err
		}
		// Pushes under way when the daemon stops are given up: the
		// next build of the image pushes again.
		defer pusher.Close(ctx)
		images, err := cfg.ImageBuilder(builder, plugin.WithCache(layers), plugin.WithClaims(claims), plugin.WithPusher(pusher))
		if err != nil {
			return err
		}
		provisioners := newProvisioners(cfg, images, sn)
		defer provisioners.Close()
		if cfg.Registry.Address != "" {
			opts := []registry.Opt{registry.WithEarlyHeaders(time.Duration(cfg.Registry.EarlyHeaders))}
			if len(targets) > 0 {
				opts = append(opts, registry.WithDescriber(provisioners.stager(targets)))
			}
			endpoint := registry.New(images, opts...)
			g.Go(func() error { return registry.Serve(ctx, endpoint, cfg.Registry) })
		}
		if cfg.API.Socket != "" {
			g.Go(func() error { return api.Serve(ctx, &daemonAPI{provisioners}, cfg.API.Socket) })
		}
	}
	return g.Wait()
}
