package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sync/errgroup"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/registry"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
)

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: nixery-snapshotter serve [FLAGS]\n\nServes the nix snapshotter to containerd ([proxy_plugins.nix] in its config).\n\nFlags:")
		fs.PrintDefaults()
	}
	var (
		address    = fs.String("address", "", "unix socket to serve on (default /run/nixery-snapshotter/nixery-snapshotter.sock)")
		root       = fs.String("root", "", "state directory (default /var/lib/nixery-snapshotter)")
		ctrAddress = fs.String("containerd-address", "", "containerd socket, used when the daemon provisions images")
		regAddress = fs.String("registry-address", "", "address of the distribution endpoint (default 127.0.0.1:8484; \"\" disables it)")
		metAddress = fs.String("metrics-address", "", "address of /metrics and /healthz (default 127.0.0.1:9484; \"\" disables them)")
	)
	common := addCommonFlags(fs, "info")
	positional, cfg, err := common.parse(fs, args)
	if err != nil {
		return err
	}
	if len(positional) != 0 {
		fs.Usage()
		return fmt.Errorf("serve takes no arguments, got %v", positional)
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "address":
			cfg.Snapshotter.Address = *address
		case "root":
			cfg.Snapshotter.Root = *root
		case "containerd-address":
			cfg.Containerd.Address = *ctrAddress
		case "registry-address":
			cfg.Registry.Address = *regAddress
		case "metrics-address":
			cfg.Metrics.Address = *metAddress
		}
	})

	// Serving needs neither Nix nor containerd to be up, since the daemon
	// starts before both: Nix runs for requests only.
	builder, err := cfg.Nix.Builder(nixbuild.WithWorkDir(cfg.WorkDir()))
	if err != nil {
		return err
	}
	defer builder.Close()
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
	g.Go(func() error { return plugin.ServeSnapshotter(ctx, sn, cfg.Snapshotter.Address) })
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
	if cfg.Registry.Address != "" || cfg.Registry.Socket != "" {
		cache, err := plugin.OpenCache(cfg.CacheDir(), 5*time.Second)
		if err != nil {
			return err
		}
		defer cache.Close()
		images, err := cfg.ImageBuilder(builder, plugin.WithCache(cache), plugin.WithClaims(claims), plugin.WithRootGrace(plugin.DefaultRootGrace))
		if err != nil {
			return err
		}
		endpoint := registry.New(images, registry.WithEarlyHeaders(time.Duration(cfg.Registry.EarlyHeaders)))
		g.Go(func() error { return registry.Serve(ctx, endpoint, cfg.Registry) })
	}
	return g.Wait()
}
