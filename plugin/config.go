package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"

	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"

	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/listen"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/push"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// Config is the daemon's and the CLI's configuration file. Every key is
// optional; DefaultConfig holds the defaults, and config.toml.example
// documents them.
type Config struct {
	Containerd  ContainerdConfig  `toml:"containerd"`
	Nix         NixConfig         `toml:"nix"`
	Image       ImageConfig       `toml:"image"`
	Snapshotter SnapshotterConfig `toml:"snapshotter"`
	Registry    RegistryConfig    `toml:"registry"`
	API         APIConfig         `toml:"api"`
	Metrics     MetricsConfig     `toml:"metrics"`
}

// APIConfig is where the `serve` daemon answers the CLI (plugin/api).
type APIConfig struct {
	// Socket is a unix socket (0660, in a 0700 directory): no user but
	// root can listen there, so what answers is the daemon. Empty disables
	// it (the CLI then builds alone).
	Socket string `toml:"socket"`
}

// MetricsConfig is where `serve` exposes /metrics and /healthz.
type MetricsConfig struct {
	// Address is the TCP address; loopback unless you mean it; "" disables.
	Address string `toml:"address"`
}

// RegistryConfig is the `serve` daemon's distribution endpoint.
type RegistryConfig struct {
	// Address is the TCP address to listen on, for containerd: loopback,
	// or any other with TLS and client certificates. Empty disables it.
	Address string `toml:"address"`
	// TLSCert and TLSKey make Address HTTPS; ClientCA makes clients
	// present a certificate it signed (containerd: hosts.toml `client`).
	TLSCert  string `toml:"tls_cert"`
	TLSKey   string `toml:"tls_key"`
	ClientCA string `toml:"client_ca"`
	// EarlyHeaders is how long a manifest request waits for its build
	// before it answers with headers only, and sends the manifest when it
	// is built (containerd drops requests without headers after 30 s).
	EarlyHeaders Duration `toml:"early_headers"`
	// UnpackInto lists the namespaces of the daemon's containerd, each
	// "namespace" (its default snapshotter) or "namespace/snapshotter",
	// whose pulls through the endpoint find an image's layers unpacked
	// already, linked to the store, when its manifest is answered: no
	// layer blob crosses. Pulls into the nix snapshotter need none.
	UnpackInto []string `toml:"unpack_into"`
}

// StageTargets are UnpackInto, read.
func (c RegistryConfig) StageTargets() ([]StageTarget, error) {
	var targets []StageTarget
	for _, s := range c.UnpackInto {
		t, err := ParseStageTarget(s)
		if err != nil {
			return nil, fmt.Errorf("[registry] unpack_into: %w", err)
		}
		targets = append(targets, t)
	}
	return targets, nil
}

// TLS is the endpoint's TLS configuration.
func (c RegistryConfig) TLS() listen.TLSFiles {
	return listen.TLSFiles{Cert: c.TLSCert, Key: c.TLSKey, ClientCA: c.ClientCA}
}

// SnapshotterConfig is the `serve` daemon's.
type SnapshotterConfig struct {
	// Address is the unix socket containerd's proxy plugin connects to.
	Address string `toml:"address"`
	// Root holds the snapshots; on the same filesystem as /nix/store, store
	// files are hard-linked rather than copied.
	Root string `toml:"root"`
	// GCRootsDir holds the Nix GC roots of store paths in snapshots; it must
	// be below /nix/var/nix/gcroots.
	GCRootsDir string `toml:"gc_roots_dir"`
	// TrustOtherImages materialises store-path layers of images this node
	// did not build too (they are still checked to be valid store paths of
	// this node's store): for nodes whose every image source is trusted.
	// Otherwise such layers are unpacked from their blobs, as any image's.
	TrustOtherImages bool `toml:"trust_other_images"`
}

// ContainerdConfig says which containerd to talk to.
type ContainerdConfig struct {
	// Address is containerd's gRPC socket.
	Address string `toml:"address"`
	// Namespace images are registered in; $CONTAINERD_NAMESPACE overrides
	// the default.
	Namespace string `toml:"namespace"`
	// Snapshotter to unpack into; empty means the namespace's default.
	Snapshotter string `toml:"snapshotter"`
	// NixSnapshotter is the name under which containerd knows our `nix`
	// snapshotter ([proxy_plugins.NAME]). Images unpacked into it carry
	// store-path references instead of layer blobs.
	NixSnapshotter string `toml:"nix_snapshotter"`
}

// NixConfig says where packages come from and how Nix is run.
type NixConfig struct {
	// Exactly one package source, or none for the `<nixpkgs>` search path entry.
	PkgsPath    string `toml:"pkgs_path"`
	PkgsGit     string `toml:"pkgs_git"`
	PkgsChannel string `toml:"pkgs_channel"`
	PkgsFlake   string `toml:"pkgs_flake"`
	// Revisions are the tags served (path.Match patterns such as
	// "nixos-*", or commit ids): a tag selects a revision of the package
	// source, which the node fetches and evaluates, so only the operator
	// chooses them. Default: ["latest"], the source as configured.
	Revisions []string `toml:"revisions"`
	// Pinned treats the package source as pinned whatever the tag, so its
	// images are cached and repeated requests start no Nix. Git commits
	// and channel commits are pinned anyway; say so for a path whose
	// content you control.
	Pinned bool `toml:"pinned"`
	// Timeout bounds one whole prepare step (evaluation and builds).
	Timeout Duration `toml:"timeout"`
	// BinDir holds nix-instantiate, nix-store and nix; empty means PATH.
	BinDir string `toml:"bin_dir"`
	// PushTo are Nix store URIs (binary caches: file://, http(s)://,
	// s3://, ssh://) every built image's closure is copied to, in the
	// background, for other nodes to substitute.
	PushTo []string `toml:"push_to"`
	// PushSecretKey is the file of the key (nix-store
	// --generate-binary-cache-key) that signs what is pushed.
	PushSecretKey string `toml:"push_secret_key"`
	// MaxBuilds bounds how many different images are built at once; more
	// requests for an image being built join that build.
	MaxBuilds int `toml:"max_builds"`
	// MaxQueued bounds builds of different images waiting for a slot;
	// further requests are refused as busy (HTTP 429) until one ends.
	MaxQueued int `toml:"max_queued"`
	// Config is nixpkgs' config attribute set, e.g. allowUnfree = true,
	// passed to the package set as data.
	Config map[string]any `toml:"config"`
	// Overlays are Nix files of overlays (absolute paths) passed to the
	// package set; evaluation may read them.
	Overlays []string `toml:"overlays"`
	// Options are Nix settings passed to every call, e.g.
	// substituters = "" on hosts that cannot reach a binary cache.
	Options map[string]string `toml:"options"`
}

// ImageConfig shapes the images.
type ImageConfig struct {
	// Host is the registry host of image references.
	Host string `toml:"host"`
	// MaxLayers bounds the layers of an image, the symlink layer included.
	MaxLayers int `toml:"max_layers"`
	// WithLayers writes tar layers into the content store (for export, or
	// for other snapshotters to unpack the same image) rather than
	// unpacking them straight from the store into snapshots.
	WithLayers bool `toml:"with_layers"`
	// Layering is the grouping algorithm: "auto" (nixpkgs' size-first) or
	// "nixery" (dominator tree).
	Layering string `toml:"layering"`
	// PopularityFile is a Nixery popularity file (JSON: package name →
	// how many packages need it) for the "nixery" algorithm.
	PopularityFile string `toml:"popularity_file"`
	// Allow, when set, lists the package attributes references may ask
	// for (path.Match patterns such as "python3Packages.*"), for nodes
	// whose users should not build arbitrary packages.
	Allow []string `toml:"allow"`
	// Platforms, when set, make a reference that names no platform an
	// image index of one image per platform ("linux/amd64",
	// "linux/arm64"); empty: an image of the node's platform.
	Platforms []string `toml:"platforms"`
	// User is whom images run as: "root" (the default), a name (uid and
	// gid 1000), "uid:gid" or "name:uid:gid" (tarstream.ParseUser).
	User string `toml:"user"`
}

// ParsedPlatforms are Platforms as images are built for them.
func (c ImageConfig) ParsedPlatforms() ([]resolver.Platform, error) {
	var platforms []resolver.Platform
	for _, s := range c.Platforms {
		p, err := resolver.ParsePlatform(s)
		if err != nil {
			return nil, fmt.Errorf("[image] platforms: %w", err)
		}
		if slices.Contains(platforms, p) {
			return nil, fmt.Errorf("[image] platforms: %s twice: %w", p, errdefs.ErrInvalidArgument)
		}
		platforms = append(platforms, p)
	}
	return platforms, nil
}

// Duration is a time.Duration written as "30m" in TOML.
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// DefaultRegistryAddress is where the distribution endpoint listens: loopback only.
const DefaultRegistryAddress = "127.0.0.1:8484"

// DefaultAPISocket is where the CLI finds the daemon.
const DefaultAPISocket = "/run/nixery-snapshotter/api.sock"

// DefaultEarlyHeaders is how long a manifest request waits for its build
// before answering with headers alone: containerd gives up on a response
// without headers after 30 s (and retries only a few times), while it
// waits for a body as long as its pull may take.
const DefaultEarlyHeaders = 20 * time.Second

// DefaultConfig is the configuration without a file.
func DefaultConfig() Config {
	ns := os.Getenv("CONTAINERD_NAMESPACE")
	if ns == "" {
		ns = "default"
	}
	return Config{
		Containerd: ContainerdConfig{Address: "/run/containerd/containerd.sock", Namespace: ns, NixSnapshotter: "nix"},
		Nix: NixConfig{Timeout: Duration(nixbuild.DefaultTimeout), MaxBuilds: DefaultMaxBuilds, MaxQueued: DefaultMaxQueued,
			Revisions: nixbuild.DefaultRevisions, Options: map[string]string{}},
		Image: ImageConfig{Host: resolver.DefaultHost, MaxLayers: DefaultMaxLayers, Layering: string(layering.DefaultAlgorithm), User: "root"},
		Snapshotter: SnapshotterConfig{
			Address:    "/run/nixery-snapshotter/nixery-snapshotter.sock",
			Root:       "/var/lib/nixery-snapshotter",
			GCRootsDir: snapshot.DefaultGCRootsDir,
		},
		Registry: RegistryConfig{Address: DefaultRegistryAddress, EarlyHeaders: Duration(DefaultEarlyHeaders), UnpackInto: []string{CRINamespace + "/overlayfs"}},
		API:      APIConfig{Socket: DefaultAPISocket},
		Metrics:  MetricsConfig{Address: DefaultMetricsAddress},
	}
}

// LoadConfig reads path over the defaults. Unknown keys are errors, so a
// typo does not silently fall back to a default.
func LoadConfig(path string) (Config, error) {
	cfg := DefaultConfig()
	f, err := os.Open(path)
	if err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	dec := toml.NewDecoder(f).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			var keys []string
			hint := ""
			for _, e := range strict.Errors {
				key := strings.Join(e.Key(), ".")
				keys = append(keys, key)
				if key == "registry.socket" {
					hint = " ([registry] socket is now [api] socket: the CLI talks to the daemon through its API)"
				}
			}
			return cfg, fmt.Errorf("config %s: unknown keys %s%s: %w", path, strings.Join(keys, ", "), hint, errdefs.ErrInvalidArgument)
		}
		return cfg, fmt.Errorf("config %s: %w: %w", path, err, errdefs.ErrInvalidArgument)
	}
	return cfg, nil
}

// Source is the configured package source.
func (c NixConfig) Source() (nixbuild.Source, error) {
	set := 0
	for _, s := range []string{c.PkgsPath, c.PkgsGit, c.PkgsChannel, c.PkgsFlake} {
		if s != "" {
			set++
		}
	}
	switch {
	case set > 1:
		return nixbuild.Source{}, fmt.Errorf("more than one package source (pkgs_path %q, pkgs_git %q, pkgs_channel %q, pkgs_flake %q): choose one: %w",
			c.PkgsPath, c.PkgsGit, c.PkgsChannel, c.PkgsFlake, errdefs.ErrInvalidArgument)
	case c.PkgsFlake != "":
		if len(c.Config) > 0 || len(c.Overlays) > 0 {
			return nixbuild.Source{}, fmt.Errorf("[nix] config and overlays are nixpkgs' arguments, which a flake (pkgs_flake) fixes itself: remove them or change the flake: %w", errdefs.ErrInvalidArgument)
		}
		return nixbuild.FlakeSource(c.PkgsFlake)
	case c.PkgsPath != "":
		if _, err := os.Stat(c.PkgsPath + "/default.nix"); err != nil {
			return nixbuild.Source{}, fmt.Errorf("package set %s: %w", c.PkgsPath, err)
		}
		return nixbuild.PathSource(c.PkgsPath)
	case c.PkgsGit != "":
		return nixbuild.GitSource(c.PkgsGit), nil
	case c.PkgsChannel != "":
		return nixbuild.ChannelSource(c.PkgsChannel), nil
	}
	return nixbuild.ChannelSource("<nixpkgs>"), nil
}

// Builder returns a Nix builder for this configuration.
func (c NixConfig) Builder(opts ...nixbuild.Opt) (*nixbuild.Builder, error) {
	src, err := c.Source()
	if err != nil {
		return nil, err
	}
	for _, o := range c.Overlays {
		if !filepath.IsAbs(o) {
			return nil, fmt.Errorf("[nix] overlays: %q is not an absolute path: %w", o, errdefs.ErrInvalidArgument)
		}
		if _, err := os.Stat(o); err != nil {
			return nil, fmt.Errorf("[nix] overlays: %w", err)
		}
	}
	return nixbuild.New(src, append([]nixbuild.Opt{
		nixbuild.WithNixpkgsConfig(c.Config, c.Overlays),
		nixbuild.WithTimeout(time.Duration(c.Timeout)),
		nixbuild.WithOptions(c.Options),
		nixbuild.WithBinDir(c.BinDir),
		nixbuild.WithRevisions(c.Revisions),
	}, opts...)...), nil
}

// Pusher returns what pushes built closures to PushTo with nix: nothing
// when PushTo is empty. Close it.
func (c NixConfig) Pusher(nix push.Nix) (*push.Pusher, error) {
	var to []string
	for _, uri := range c.PushTo {
		u, err := url.Parse(uri)
		if err != nil || u.Scheme == "" {
			return nil, fmt.Errorf("[nix] push_to: %q is not a Nix store URI (such as file:///srv/cache or https://cache.example.org): %w", uri, errdefs.ErrInvalidArgument)
		}
		if c.PushSecretKey != "" {
			if !binaryCacheSchemes[u.Scheme] {
				return nil, fmt.Errorf("[nix] push_to: %q is not a binary cache (file, http, https, s3), which alone sign what they are sent with push_secret_key: %w", uri, errdefs.ErrInvalidArgument)
			}
			if u.Query().Has("secret-key") {
				return nil, fmt.Errorf("[nix] push_to: %q names a secret-key of its own, and push_secret_key is set too: %w", uri, errdefs.ErrInvalidArgument)
			}
			// Appended to the query as written: Nix decodes %XX only (not
			// + for a space), and the rest is the operator's.
			sep := "?"
			if strings.Contains(uri, "?") {
				sep = "&"
			}
			uri += sep + "secret-key=" + strings.ReplaceAll(url.QueryEscape(c.PushSecretKey), "+", "%20")
		}
		to = append(to, uri)
	}
	if c.PushSecretKey != "" {
		if len(c.PushTo) == 0 {
			return nil, fmt.Errorf("[nix] push_secret_key is set but push_to is empty: %w", errdefs.ErrInvalidArgument)
		}
		if _, err := os.Stat(c.PushSecretKey); err != nil {
			return nil, fmt.Errorf("[nix] push_secret_key: %w", err)
		}
	}
	timeout := time.Duration(c.Timeout)
	if timeout <= 0 {
		timeout = nixbuild.DefaultTimeout
	}
	return push.New(nix, to, timeout), nil
}

// binaryCacheSchemes are Nix's stores that take a secret-key to sign with.
var binaryCacheSchemes = map[string]bool{"file": true, "http": true, "https": true, "s3": true}

// ImageBuilder returns the image builder for this configuration.
func (c Config) ImageBuilder(nix Nix, opts ...BuildOpt) (*ImageBuilder, error) {
	lopts := []layering.Opt{layering.WithAlgorithm(layering.Algorithm(c.Image.Layering))}
	if c.Image.PopularityFile != "" {
		b, err := os.ReadFile(c.Image.PopularityFile)
		if err != nil {
			return nil, fmt.Errorf("popularity file: %w", err)
		}
		var pop map[string]int
		if err := json.Unmarshal(b, &pop); err != nil {
			return nil, fmt.Errorf("popularity file %s: %w: %w", c.Image.PopularityFile, err, errdefs.ErrInvalidArgument)
		}
		lopts = append(lopts, layering.WithPopularity(pop))
	}
	user, err := tarstream.ParseUser(c.Image.User)
	if err != nil {
		return nil, fmt.Errorf("[image] user: %w", err)
	}
	platforms, err := c.Image.ParsedPlatforms()
	if err != nil {
		return nil, err
	}
	return NewImageBuilder(nix, append([]BuildOpt{
		WithUser(user),
		WithPlatforms(platforms),
		WithHost(c.Image.Host),
		WithMaxLayers(c.Image.MaxLayers),
		WithMaxBuilds(c.Nix.MaxBuilds),
		WithMaxQueued(c.Nix.MaxQueued),
		WithAllow(c.Image.Allow),
		WithPinnedSource(c.Nix.Pinned),
		WithLayering(lopts...),
	}, opts...)...), nil
}

// Claims opens the record of the layers this node built, which the nix
// snapshotter and pulls believe (snapshot.Claims).
func (c Config) Claims() (*snapshot.Claims, error) {
	return snapshot.OpenClaims(filepath.Join(c.Snapshotter.Root, "claims"))
}

// WorkDir holds the directories of this project's processes (their files,
// the owners of their leases, their temporary mounts), each removed by the
// next process once its own is gone.
func (c Config) WorkDir() string { return filepath.Join(c.Snapshotter.Root, "work") }

// CacheDir is where the layer and image cache lives.
func (c Config) CacheDir() string { return filepath.Join(c.Snapshotter.Root, "cache") }

// Connect returns a client of the containerd at c.Address, or a clear
// error if none answers there.
func (c ContainerdConfig) Connect(ctx context.Context) (*containerd.Client, error) {
	client, err := containerd.New(c.Address, containerd.WithDefaultNamespace(c.Namespace))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", c.Address, err)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Version(vctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("containerd at %s does not answer: %w", c.Address, err)
	}
	log.G(ctx).WithField("address", c.Address).Debug("connected to containerd")
	return client, nil
}
