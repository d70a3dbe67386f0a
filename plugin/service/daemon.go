package service

import (
	"context"
	"errors"
	"fmt"
	"sync"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/errkind"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/version"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/api"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream/linked"
)

// daemonAPI is what the daemon does for its CLI (api.Daemon): it builds
// images with the daemon's ImageBuilder, which the distribution endpoint
// shares, and registers them in the containerd the CLI names (by default
// the daemon's), as `pull` would. So every client of a node shares its
// builds and its cache, and no store path has to be handed from the
// daemon to another process.
type daemonAPI struct {
	*provisioners
}

// provisioners provision with one ImageBuilder into the containerds the
// daemon is asked to, its own by default, each connected once it answers.
type provisioners struct {
	builder *plugin.ImageBuilder
	ctd     plugin.ContainerdConfig
	workDir string
	links   linked.Roots // for the daemon's life
	staged  plugin.Staged
	// nix is the daemon's nix snapshotter, the one its own containerd
	// reaches as the nix snapshotter.
	nix plugin.Prefiller

	mu      sync.Mutex
	clients map[string]*containerd.Client // by address, once it answered
}

// newProvisioners provisions with builder into the containerd of cfg,
// whose nix snapshotter is nix.
func newProvisioners(cfg plugin.Config, builder *plugin.ImageBuilder, nix plugin.Prefiller) *provisioners {
	return &provisioners{builder: builder, ctd: cfg.Containerd, workDir: cfg.WorkDir(), nix: nix, clients: map[string]*containerd.Client{}}
}

// provisioner is the Provisioner into the containerd at address ("": the
// daemon's), unpacking into snapshotter ("": the namespace's default).
func (s *provisioners) provisioner(ctx context.Context, address, snapshotter string, withLayers bool) (*plugin.Provisioner, error) {
	if address == "" {
		address = s.ctd.Address
	}
	client, err := s.containerd(ctx, address)
	if err != nil {
		return nil, err
	}
	opts := []plugin.ProvisionerOpt{
		plugin.WithSnapshotter(snapshotter),
		plugin.WithNixSnapshotter(s.ctd.NixSnapshotter),
		plugin.WithLayerBlobs(withLayers),
		plugin.WithWorkDir(s.workDir),
		plugin.WithLinks(&s.links),
	}
	if address == s.ctd.Address {
		// Another containerd reaches another node's nix snapshotter.
		opts = append(opts, plugin.WithPrefiller(s.nix))
	}
	return plugin.NewProvisioner(client, s.builder, opts...), nil
}

// stager is the endpoint's Describer of each request (registry
// WithDescriber): staging into targets in the daemon's containerd, or when
// that cannot be reached, by digest alone.
func (s *provisioners) stager(targets []plugin.StageTarget) func(context.Context) layer.Describer {
	return func(ctx context.Context) layer.Describer {
		p, err := s.provisioner(ctx, "", "", false)
		if err != nil {
			plugin.StagingFailed(ctx, err)
			return s.builder.DigestDescriber()
		}
		return p.Stager(targets, &s.staged)
	}
}

// Info implements api.Daemon.
func (s *daemonAPI) Info(context.Context) (api.Info, error) {
	return api.Info{Version: version.Version(), PackageSource: s.builder.Nix().Source().String(), Host: s.builder.Host(), User: s.builder.User().Key(), Platforms: s.builder.Platforms()}, nil
}

// Build implements api.Daemon.
func (s *daemonAPI) Build(ctx context.Context, req api.BuildRequest) (api.BuildResult, error) {
	if req.Namespace == "" {
		return api.BuildResult{}, fmt.Errorf("a build request needs a containerd namespace: %w", errdefs.ErrInvalidArgument)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"ref": req.Ref, "namespace": req.Namespace}))
	log.G(ctx).Info("building for the CLI")
	p, err := s.provisioner(ctx, req.Containerd, req.Snapshotter, req.WithLayers)
	if err != nil {
		// Not Unavailable: that would read as the daemon itself gone.
		return api.BuildResult{}, fmt.Errorf("the daemon cannot register images: %v: %w", err, errdefs.ErrFailedPrecondition)
	}
	img, err := p.Provision(namespaces.WithNamespace(ctx, req.Namespace), req.Ref)
	if err != nil {
		return api.BuildResult{}, errkind.Carried(err)
	}
	return api.BuildResult{Name: img.Name, Digest: img.Target.Digest.String()}, nil
}

// containerd is the client of the containerd at address, connected at
// the first request that finds it up (the daemon starts before its own).
func (s *provisioners) containerd(ctx context.Context, address string) (*containerd.Client, error) {
	s.mu.Lock()
	client, ok := s.clients[address]
	s.mu.Unlock()
	if ok {
		return client, nil
	}
	cfg := s.ctd
	cfg.Address = address
	client, err := cfg.Connect(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if known, ok := s.clients[address]; ok {
		client.Close() // another request connected meanwhile
		return known, nil
	}
	s.clients[address] = client
	return client, nil
}

// Close closes the connections to containerd.
func (s *provisioners) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	errs := []error{s.links.Close()}
	for _, c := range s.clients {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
