package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
)

func pull(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pull", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: nixery-snapshotter pull [FLAGS] REF\n\nBuilds the image for REF (e.g. nix.local/shell/htop) from Nix packages and registers it in containerd.\n\nFlags:")
		fs.PrintDefaults()
	}
	var (
		address     = fs.String("address", "", "containerd socket (default /run/containerd/containerd.sock)")
		namespace   = fs.String("namespace", "", "containerd namespace (default $CONTAINERD_NAMESPACE or \"default\")")
		snapshotter = fs.String("snapshotter", "", "snapshotter to unpack into (default: the namespace's default)")
		withLayers  = fs.Bool("with-layers", false, "write the tar layers into the content store too (for export or push), not only into snapshots")
	)
	common := addCommonFlags(fs, "warn")
	positional, cfg, err := common.parse(fs, args)
	if err != nil {
		return err
	}
	if len(positional) != 1 {
		fs.Usage()
		return fmt.Errorf("pull takes exactly one image reference, got %d", len(positional))
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "address":
			cfg.Containerd.Address = *address
		case "namespace":
			cfg.Containerd.Namespace = *namespace
		case "snapshotter":
			cfg.Containerd.Snapshotter = *snapshotter
		case "with-layers":
			cfg.Image.WithLayers = *withLayers
		}
	})

	progress := newDisplay(stderr)
	defer progress.done()
	builder, err := cfg.Nix.Builder(nixbuild.WithProgress(progress.nix), nixbuild.WithWorkDir(cfg.WorkDir()))
	if err != nil {
		return err
	}
	defer builder.Close()

	client, err := connect(ctx, cfg.Containerd)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, cfg.Containerd.Namespace)

	// The daemon holds the cache while it runs (and then builds for us);
	// without it, use the cache here, or do without if it is elsewhere busy.
	cache, err := plugin.OpenCache(cfg.CacheDir(), time.Millisecond) // one try: busy means the daemon has it
	if err != nil {
		log.G(ctx).WithError(err).Debug("building without the cache")
	}
	defer cache.Close()
	claims, err := cfg.Claims()
	if err != nil {
		return fmt.Errorf("%w (pull runs as root, as containerd does)", err)
	}
	images, err := cfg.ImageBuilder(builder, plugin.WithProgress(progress), plugin.WithCache(cache), plugin.WithClaims(claims))
	if err != nil {
		return err
	}
	p := plugin.NewProvisioner(client, images,
		plugin.WithSnapshotter(cfg.Containerd.Snapshotter),
		plugin.WithNixSnapshotter(cfg.Containerd.NixSnapshotter),
		plugin.WithLayerBlobs(cfg.Image.WithLayers),
		plugin.WithDaemon(cfg.Registry.Socket),
		plugin.WithWorkDir(cfg.WorkDir()))
	img, err := p.Provision(ctx, positional[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s %s\n", img.Name, img.Target.Digest)
	return nil
}

// connect returns a client of the containerd at cfg.Address, or a clear
// error if none answers there.
func connect(ctx context.Context, cfg plugin.ContainerdConfig) (*containerd.Client, error) {
	client, err := containerd.New(cfg.Address, containerd.WithDefaultNamespace(cfg.Namespace))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", cfg.Address, err)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Version(vctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("containerd at %s does not answer: %w", cfg.Address, err)
	}
	log.G(ctx).WithField("address", cfg.Address).Debug("connected to containerd")
	return client, nil
}
