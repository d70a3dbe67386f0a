package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/service"
)

func pull(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("pull", "pull [FLAGS] REF\n\nBuilds the image for REF (e.g. nix.local/shell/htop) from Nix packages and registers it in containerd.", stderr)
	var (
		address     = fs.String("address", "", "containerd socket (default /run/containerd/containerd.sock)")
		namespace   = fs.String("namespace", "", "containerd namespace (default $CONTAINERD_NAMESPACE or \"default\")")
		snapshotter = fs.String("snapshotter", "", "snapshotter to unpack into (default: the namespace's default)")
		withLayers  = fs.Bool("with-layers", false, "write the tar layers into the content store too (for export or push), not only into snapshots")
	)
	common := addCommonFlags(fs, "warn")
	positional, cfg, err := common.parse(fs, args, "an image reference")
	if err != nil {
		return err
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

	ref := positional[0]
	display := newDisplay(stderr)
	defer display.done()
	ctx = progress.WithSink(ctx, display)

	name, dgst, err := service.Pull(ctx, cfg, ref)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s %s\n", name, dgst)
	return nil
}
