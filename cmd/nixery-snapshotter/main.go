// Command nixery-snapshotter turns references like nix.local/shell/htop into
// images in containerd, built from Nix packages on the node itself.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/version"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
)

const usage = `usage: nixery-snapshotter COMMAND [FLAGS] [ARGS]

Commands:
  pull REF          build the image for REF from Nix packages and register it in containerd
  export REF FILE   build it and write it as an OCI image layout archive (for hosts without Nix)
  push REF DEST     build it and push it to a registry
  serve             serve the nix snapshotter to containerd
  version           print the version (also --version)

Run 'nixery-snapshotter COMMAND -h' for a command's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "nixery-snapshotter:", err)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return flag.ErrHelp
	}
	switch args[0] {
	case "pull":
		return pull(ctx, args[1:], stdout, stderr)
	case "export":
		return export(ctx, args[1:], stdout, stderr)
	case "push":
		return push(ctx, args[1:], stdout, stderr)
	case "serve":
		return serve(ctx, args[1:], stderr)
	case "--version", "-version", "version":
		fmt.Fprintln(stdout, "nixery-snapshotter", version.Version())
		return nil
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}

// parseInterspersed parses flags that may come before or after positional
// arguments (`pull REF --namespace k8s.io`), which package flag does not.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional, nil
		}
		if args[0] == "--" {
			return append(positional, args[1:]...), nil
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}

// newFlagSet is the flag set of a command whose usage is usage (its
// synopsis and what it does), followed by its flags.
func newFlagSet(name, usage string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: nixery-snapshotter %s\n\nFlags:\n", usage)
		fs.PrintDefaults()
	}
	return fs
}

// keyValues is a repeatable NAME=VALUE flag.
type keyValues map[string]string

func (kv keyValues) String() string { return "" }

func (kv keyValues) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not NAME=VALUE", s)
	}
	kv[k] = v
	return nil
}

func setLogLevel(level string) error {
	if err := log.SetLevel(level); err != nil {
		return fmt.Errorf("log level %q: %w", level, err)
	}
	return log.SetFormat(log.TextFormat)
}

// commonFlags are the flags of every command: configuration, logging, the
// package source and Nix.
type commonFlags struct {
	configPath, logLevel           *string
	pkgsPath, pkgsGit, pkgsChannel *string
	pkgsFlake                      *string
	timeout                        *time.Duration
	nixOptions                     keyValues
}

func addCommonFlags(fs *flag.FlagSet, logLevel string) *commonFlags {
	s := &commonFlags{
		configPath:  fs.String("config", "", "configuration file (TOML; see config.toml.example)"),
		logLevel:    fs.String("log-level", logLevel, "log level: debug, info, warn, error"),
		pkgsPath:    fs.String("pkgs-path", "", "package set: a directory whose default.nix is a nixpkgs-like set"),
		pkgsGit:     fs.String("pkgs-git", "", "package set: a git repository (the tag selects a commit or ref)"),
		pkgsChannel: fs.String("pkgs-channel", "", "package set: a nixpkgs channel or commit, or <nixpkgs> (default)"),
		pkgsFlake:   fs.String("pkgs-flake", "", "package set: a flake (path:/srv/flake, git+file:///srv/flake, ...): its packages, then legacyPackages"),
		timeout:     fs.Duration("timeout", 0, "bound on the Nix prepare step (default 30m)"),
		nixOptions:  keyValues{},
	}
	fs.Var(s.nixOptions, "nix-option", "Nix setting NAME=VALUE for every Nix call (repeatable), e.g. substituters=")
	return s
}

// parse parses args, sets up logging and returns the positional arguments
// (of which there must be as many as names) and the configuration file (or
// the defaults) with the common flags that were given applied over it.
func (src *commonFlags) parse(fs *flag.FlagSet, args []string, names ...string) ([]string, plugin.Config, error) {
	cfg := plugin.DefaultConfig()
	positional, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, cfg, err
	}
	if len(positional) != len(names) {
		fs.Usage()
		if len(names) == 0 {
			return nil, cfg, fmt.Errorf("%s takes no arguments, got %v", fs.Name(), positional)
		}
		return nil, cfg, fmt.Errorf("%s takes %s, got %d arguments", fs.Name(), strings.Join(names, " and "), len(positional))
	}
	if err := setLogLevel(*src.logLevel); err != nil {
		return nil, cfg, err
	}
	if *src.configPath != "" {
		if cfg, err = plugin.LoadConfig(*src.configPath); err != nil {
			return nil, cfg, err
		}
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "pkgs-path", "pkgs-git", "pkgs-channel", "pkgs-flake":
			// A source on the command line replaces the configured one.
			cfg.Nix.PkgsPath, cfg.Nix.PkgsGit, cfg.Nix.PkgsChannel, cfg.Nix.PkgsFlake = *src.pkgsPath, *src.pkgsGit, *src.pkgsChannel, *src.pkgsFlake
		case "timeout":
			cfg.Nix.Timeout = plugin.Duration(*src.timeout)
		}
	})
	maps.Copy(cfg.Nix.Options, src.nixOptions)
	return positional, cfg, nil
}
