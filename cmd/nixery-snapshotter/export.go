package main

import (
	"context"
	"fmt"
	"io"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/service"
)

func export(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("export", "export [FLAGS] REF FILE\n\nBuilds the image for REF and writes it to FILE (\"-\": standard output) as an OCI image layout archive,\nfor hosts without Nix: ctr images import, podman load, docker load, skopeo copy oci-archive:FILE.", stderr)
	common := addCommonFlags(fs, "warn")
	positional, cfg, err := common.parse(fs, args, "an image reference", "a file")
	if err != nil {
		return err
	}
	display := newDisplay(stderr)
	defer display.done()
	return service.Export(progress.WithSink(ctx, display), cfg, positional[0], positional[1], stdout)
}

func push(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("push", "push [FLAGS] REF DEST\n\nBuilds the image for REF and pushes it to the registry reference DEST (e.g. registry.example.org/tools/htop:1.0),\nwith the credentials of docker's config.json ($DOCKER_CONFIG, ~/.docker) and containerd's hosts.toml files.", stderr)
	var opts service.PushOpts
	fs.StringVar(&opts.HostsDir, "hosts-dir", "/etc/containerd/certs.d", "containerd's registry host configuration (hosts.toml per host)")
	fs.BoolVar(&opts.PlainHTTP, "plain-http", false, "talk HTTP, not HTTPS, to the registry")
	common := addCommonFlags(fs, "warn")
	positional, cfg, err := common.parse(fs, args, "an image reference", "a destination")
	if err != nil {
		return err
	}
	display := newDisplay(stderr)
	defer display.done()
	dgst, err := service.Push(progress.WithSink(ctx, display), cfg, positional[0], positional[1], opts)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s %s\n", positional[1], dgst)
	return nil
}
