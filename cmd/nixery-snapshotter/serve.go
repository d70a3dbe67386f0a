package main

import (
	"context"
	"flag"
	"io"

	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/service"
)

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlagSet("serve", "serve [FLAGS]\n\nServes the nix snapshotter to containerd ([proxy_plugins.nix] in its config).", stderr)
	var (
		address    = fs.String("address", "", "unix socket to serve on (default /run/nixery-snapshotter/nixery-snapshotter.sock)")
		root       = fs.String("root", "", "state directory (default /var/lib/nixery-snapshotter)")
		ctrAddress = fs.String("containerd-address", "", "containerd socket, where the daemon registers the images pull asks it for")
		regAddress = fs.String("registry-address", "", "address of the distribution endpoint (default 127.0.0.1:8484; \"\" disables it)")
		metAddress = fs.String("metrics-address", "", "address of /metrics and /healthz (default 127.0.0.1:9484; \"\" disables them)")
	)
	common := addCommonFlags(fs, "info")
	_, cfg, err := common.parse(fs, args)
	if err != nil {
		return err
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

	return service.Serve(ctx, cfg)
}
