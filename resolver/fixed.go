package resolver

import (
	"bytes"
	"context"
	"fmt"
	"io"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Fixed is a containerd remotes.Resolver for one image that is already
// built: it resolves its name to the manifest and fetches blobs from memory
// (manifest, config) or from elsewhere (layers).
//
// It lets containerd's own pull machinery register a locally built image:
// handlers, GC labels, unpacking with the remote-snapshotter labels, and
// create-or-update of the image record all come from the client's Pull.
type Fixed struct {
	name     string
	manifest ocispec.Descriptor
	blobs    map[digest.Digest][]byte
	fetcher  remotes.Fetcher
}

// NewFixed returns a resolver that answers name with manifest. blobs holds
// small blobs by digest (at least the manifest); any other blob comes from
// fetcher.
func NewFixed(name string, manifest ocispec.Descriptor, blobs map[digest.Digest][]byte, fetcher remotes.Fetcher) *Fixed {
	return &Fixed{name: name, manifest: manifest, blobs: blobs, fetcher: fetcher}
}

// ProviderFetcher fetches blobs from a content store.
type ProviderFetcher struct{ content.Provider }

// Fetch implements remotes.Fetcher.
func (p ProviderFetcher) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	ra, err := p.ReaderAt(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", desc.Digest, err)
	}
	return struct {
		io.Reader
		io.Closer
	}{content.NewReader(ra), ra}, nil
}

var _ remotes.Resolver = (*Fixed)(nil)

// Resolve implements remotes.Resolver.
func (f *Fixed) Resolve(ctx context.Context, ref string) (string, ocispec.Descriptor, error) {
	if ref != f.name {
		return "", ocispec.Descriptor{}, fmt.Errorf("resolve %s: only %s is known here: %w", ref, f.name, errdefs.ErrNotFound)
	}
	return f.name, f.manifest, nil
}

// Fetcher implements remotes.Resolver.
func (f *Fixed) Fetcher(ctx context.Context, ref string) (remotes.Fetcher, error) { return f, nil }

// Pusher implements remotes.Resolver; images built from Nix are never pushed here.
func (f *Fixed) Pusher(ctx context.Context, ref string) (remotes.Pusher, error) {
	return nil, fmt.Errorf("push %s: %w", ref, errdefs.ErrNotImplemented)
}

// Fetch implements remotes.Fetcher.
func (f *Fixed) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if b, ok := f.blobs[desc.Digest]; ok {
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	return f.fetcher.Fetch(ctx, desc)
}
