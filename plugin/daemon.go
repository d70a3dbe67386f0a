package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/errkind"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/privdir"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Headers by which the endpoint says whose it is, so that a CLI uses it only
// for the package source it was asked to use itself.
const (
	SourceHeader = "Nixery-Package-Source"
	HostHeader   = "Nixery-Image-Host"
	// LayersParam asks the endpoint for reference layers (nix snapshotter).
	LayersParam = "nixery-layers"
)

// errUntrustedSocket says a socket someone other than root could have made.
var errUntrustedSocket = errors.New("not the daemon's socket")

// daemonClient builds images in a running daemon through its endpoint's
// unix socket: root's, so that whatever answers is the daemon. (Any user
// can listen on a TCP port while the daemon is down.)
type daemonClient struct {
	socket string
	http   *http.Client
}

func newDaemonClient(socket string) *daemonClient {
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		if err := privdir.Check(socket); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", errUntrustedSocket, socket, err)
		}
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}
	// No overall timeout: a build takes as long as Nix does, bounded by the
	// daemon's own timeout and by the caller's context.
	return &daemonClient{socket: socket, http: &http.Client{Transport: &http.Transport{DialContext: dial}}}
}

func (d *daemonClient) url(path string) string { return "http://nixery-daemon" + path }

// serves reports whether the daemon runs and builds what b would.
func (d *daemonClient) serves(ctx context.Context, b *Builder) bool {
	if _, err := os.Stat(d.socket); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.url("/v2/"), nil)
	if err != nil {
		return false
	}
	resp, err := d.http.Do(req)
	if errors.Is(err, errUntrustedSocket) {
		log.G(ctx).WithError(err).Warn("not building in the daemon: building here")
		return false
	}
	if err != nil {
		log.G(ctx).WithError(err).Debug("no daemon to build in")
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK &&
		resp.Header.Get(SourceHeader) == b.nix.Source().String() &&
		resp.Header.Get(HostHeader) == b.host
}

// build asks the daemon for ref's manifest (building it) and its config.
func (d *daemonClient) build(ctx context.Context, ref string, byReference bool) (*Image, remotes.Fetcher, error) {
	img, err := resolver.Parse(ref, resolver.WithHost(hostOf(ref)))
	if err != nil {
		return nil, nil, err
	}
	name := strings.TrimPrefix(img.Name, hostOf(ref)+"/")
	q := url.Values{}
	if byReference {
		q.Set(LayersParam, "reference")
	}
	mBytes, mType, err := d.get(ctx, "/v2/"+name+"/manifests/"+img.Tag+"?"+q.Encode())
	if err != nil {
		return nil, nil, fmt.Errorf("build %s in the daemon: %w", img.Ref(), err)
	}
	var manifest ocispec.Manifest
	if err := json.Unmarshal(mBytes, &manifest); err != nil {
		return nil, nil, fmt.Errorf("manifest of %s from the daemon: %w", img.Ref(), err)
	}
	var layers []*Layer
	for i, desc := range manifest.Layers {
		// Checked as any image's: they reach Nix and the file system.
		paths, symlinks, err := labels.LayerContent(desc.Annotations)
		if err == nil && len(paths) == 0 {
			err = fmt.Errorf("names no store paths: %w", errdefs.ErrInvalidArgument)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("layer %d of %s from the daemon: %w", i+1, img.Ref(), err)
		}
		layers = append(layers, &Layer{Desc: desc, Paths: paths, Symlinks: symlinks})
	}
	fetcher := daemonFetcher{d: d, name: name}
	blobs := map[digest.Digest][]byte{digest.FromBytes(mBytes): mBytes}
	// The config, and reference layers, are small: fetch them now.
	for _, desc := range append([]ocispec.Descriptor{manifest.Config}, manifest.Layers...) {
		if desc.MediaType != ocispec.MediaTypeImageConfig && desc.MediaType != labels.MediaTypeStorePaths {
			continue
		}
		b, _, err := d.get(ctx, "/v2/"+name+"/blobs/"+desc.Digest.String())
		if err != nil {
			return nil, nil, fmt.Errorf("blob %s of %s from the daemon: %w", desc.Digest, img.Ref(), err)
		}
		if digest.FromBytes(b) != desc.Digest {
			return nil, nil, fmt.Errorf("blob %s of %s from the daemon does not match its digest: %w", desc.Digest, img.Ref(), errdefs.ErrDataLoss)
		}
		blobs[desc.Digest] = b
	}
	return &Image{
		Image:    img,
		Manifest: ocispec.Descriptor{MediaType: mType, Digest: digest.FromBytes(mBytes), Size: int64(len(mBytes))},
		Config:   manifest.Config,
		Layers:   layers,
		Blobs:    blobs,
	}, fetcher, nil
}

// get returns a small document from the daemon, or its registry error as
// an error of the matching kind.
func (d *daemonClient) get(ctx context.Context, path string) ([]byte, string, error) {
	resp, err := d.open(ctx, path)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return b, resp.Header.Get("Content-Type"), err
}

func (d *daemonClient) open(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.url(path), nil)
	if err != nil {
		return nil, err
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	var doc struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&doc) != nil || len(doc.Errors) == 0 {
		return nil, fmt.Errorf("daemon answered %s", resp.Status)
	}
	e := doc.Errors[0]
	return nil, fmt.Errorf("%s: %w", e.Message, errkind.FromCode(e.Code))
}

// daemonFetcher fetches layer blobs from the daemon.
type daemonFetcher struct {
	d    *daemonClient
	name string
}

func (f daemonFetcher) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	resp, err := f.d.open(ctx, "/v2/"+f.name+"/blobs/"+desc.Digest.String())
	if err != nil {
		return nil, fmt.Errorf("fetch %s from the daemon: %w", desc.Digest, err)
	}
	return resp.Body, nil
}

// hostOf is the registry host of a reference.
func hostOf(ref string) string {
	host, _, _ := strings.Cut(ref, "/")
	return host
}
