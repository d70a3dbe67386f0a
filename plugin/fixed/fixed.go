// Package fixed is a containerd remotes.Resolver for one image that is
// already built: it resolves its name to the manifest and fetches blobs
// from memory (manifest, config, reference layers) or from a content store
// (layers written there).
//
// It lets containerd's own pull machinery register a locally built image:
// handlers, GC labels, unpacking with the remote-snapshotter labels, and
// create-or-update of the image record all come from the client's Pull.
package fixed

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

// Resolver answers one name.
type Resolver struct {
	name     string
	manifest ocispec.Descriptor
	blobs    map[digest.Digest][]byte
	store    content.Provider
}

var _ remotes.Resolver = (*Resolver)(nil)

// New returns a resolver that answers name with manifest. blobs holds
// small blobs by digest (at least the manifest); any other blob comes from
// store.
func New(name string, manifest ocispec.Descriptor, blobs map[digest.Digest][]byte, store content.Provider) *Resolver {
	return &Resolver{name: name, manifest: manifest, blobs: blobs, store: store}
}

// Resolve implements remotes.Resolver.
func (r *Resolver) Resolve(ctx context.Context, ref string) (string, ocispec.Descriptor, error) {
	if ref != r.name {
		return "", ocispec.Descriptor{}, fmt.Errorf("resolve %s: only %s is known here: %w", ref, r.name, errdefs.ErrNotFound)
	}
	return r.name, r.manifest, nil
}

// Fetcher implements remotes.Resolver.
func (r *Resolver) Fetcher(ctx context.Context, ref string) (remotes.Fetcher, error) { return r, nil }

// Pusher implements remotes.Resolver; images built from Nix are never pushed here.
func (r *Resolver) Pusher(ctx context.Context, ref string) (remotes.Pusher, error) {
	return nil, fmt.Errorf("push %s: %w", ref, errdefs.ErrNotImplemented)
}

// Fetch implements remotes.Fetcher.
func (r *Resolver) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if b, ok := r.blobs[desc.Digest]; ok {
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	ra, err := r.store.ReaderAt(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", desc.Digest, err)
	}
	return struct {
		io.Reader
		io.Closer
	}{content.NewReader(ra), ra}, nil
}
