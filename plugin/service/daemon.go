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
)

// daemonAPI is what the daemon does for its CLI (api.Daemon): it builds
// images with the daemon's ImageBuilder, which the distribution endpoint
// shares, and registers them in the containerd the CLI names (by default
// the daemon's), as `pull` would. So every client of a node shares its
// builds and its cache, and no store path has to be handed from the
// daemon to another process.
type daemonAPI struct {
	builder *plugin.ImageBuilder
	ctd     plugin.ContainerdConfig
	workDir string

	mu      sync.Mutex
	clients map[string]*containerd.Client // by address, once it answered
}

// newDaemonAPI provisions with builder into the containerd of cfg.
func newDaemonAPI(cfg plugin.Config, builder *plugin.ImageBuilder) *daemonAPI {
	return &daemonAPI{builder: builder, ctd: cfg.Containerd, workDir: cfg.WorkDir(), clients: map[string]*containerd.Client{}}
}

// Info implements api.Daemon.
func (s *daemonAPI) Info(context.Context) (api.Info, error) {
	return api.Info{Version: version.Version(), PackageSource: s.builder.Nix().Source().String(), Host: s.builder.Host()}, nil
}

// Build implements api.Daemon.
func (s *daemonAPI) Build(ctx context.Context, req api.BuildRequest) (api.BuildResult, error) {
	if req.Namespace == "" {
		return api.BuildResult{}, fmt.Errorf("a build request needs a containerd namespace: %w", errdefs.ErrInvalidArgument)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"ref": req.Ref, "namespace": req.Namespace}))
	log.G(ctx).Info("building for the CLI")
	address := req.Containerd
	if address == "" {
		address = s.ctd.Address
	}
	client, err := s.containerd(ctx, address)
	if err != nil {
		// Not Unavailable: that would read as the daemon itself gone.
		return api.BuildResult{}, fmt.Errorf("the daemon cannot register images: %v: %w", err, errdefs.ErrFailedPrecondition)
	}
	ctx = namespaces.WithNamespace(ctx, req.Namespace)
	p := plugin.NewProvisioner(client, s.builder,
		plugin.WithSnapshotter(req.Snapshotter),
		plugin.WithNixSnapshotter(s.ctd.NixSnapshotter),
		plugin.WithLayerBlobs(req.WithLayers),
		plugin.WithWorkDir(s.workDir))
	img, err := p.Provision(ctx, req.Ref)
	if err != nil {
		return api.BuildResult{}, errkind.Carried(err)
	}
	return api.BuildResult{Name: img.Name, Digest: img.Target.Digest.String()}, nil
}

// containerd is the client of the containerd at address, connected at
// the first request that finds it up (the daemon starts before its own).
func (s *daemonAPI) containerd(ctx context.Context, address string) (*containerd.Client, error) {
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
func (s *daemonAPI) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, c := range s.clients {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
