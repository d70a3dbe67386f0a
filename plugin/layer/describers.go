package layer

import (
	"context"
	"io"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// hashDescriber describes tar layers by streaming them once through
// sha256 and remembering the result in the cache, so that no layer is read
// twice to be described; content is streamed again when a blob is fetched.
type hashDescriber struct{ cache *cache.Cache }

// Digests describes tar layers by their digests alone, storing nothing
// (each read once, then remembered in c).
func Digests(c *cache.Cache) Describer { return hashDescriber{c} }

func (hashDescriber) Key() DescriberKey { return DescriberKey{Kind: "digest/1", Layers: tarLayers} }

// tarLayers is DescriberKey.Layers of describers of uncompressed tar
// layers, as tarstream writes them.
const tarLayers = "tar/1"

// Finish implements Describer: nothing is stored.
func (hashDescriber) Finish(context.Context) error { return nil }

func (h hashDescriber) Describe(ctx context.Context, _ digest.Digest, l *Layer) error {
	desc, err := digestOf(ctx, h.cache, l)
	l.Desc = desc
	return err
}

// digestOf describes tar layer l from the cache, or by streaming it once
// through sha256 (stopping when ctx ends) and remembering the result.
func digestOf(ctx context.Context, c *cache.Cache, l *Layer) (ocispec.Descriptor, error) {
	if desc, ok := c.Layer(l.CacheKey()); ok {
		return desc, nil
	}
	m := tarstream.Measure(ctxWriter{ctx, io.Discard})
	if err := l.WriteTar(m); err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: m.Digest(), Size: m.Size()}
	packed(ctx, desc)
	return desc, c.PutLayer(l.CacheKey(), desc)
}

// ctxWriter discards what is written until ctx ends, then fails.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

// UntilDone is w until ctx ends (an interrupt, a client gone), then a
// writer that fails: a layer streamed into it stops reading the store.
func UntilDone(ctx context.Context, w io.Writer) io.Writer { return ctxWriter{ctx, w} }

func (w ctxWriter) Write(p []byte) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	return w.w.Write(p)
}

// referenceDescriber describes store-path layers by identity, for the nix
// snapshotter, and leaves the symlink layer to next.
type referenceDescriber struct{ next Describer }

// References describes store-path layers by identity and leaves the
// symlink layer to next.
func References(next Describer) Describer { return referenceDescriber{next} }

// Finish implements Describer.
func (r referenceDescriber) Finish(ctx context.Context) error { return r.next.Finish(ctx) }

func (r referenceDescriber) Key() DescriberKey {
	next := r.next.Key()
	return DescriberKey{Kind: "reference/1+" + next.Kind, Layers: "reference/1+" + next.Layers, Scope: next.Scope}
}

func (r referenceDescriber) Describe(ctx context.Context, parent digest.Digest, l *Layer) error {
	if l.Symlinks {
		return r.next.Describe(ctx, parent, l)
	}
	desc, blob, err := referenceLayer(l.Paths)
	l.Desc, l.Blob = desc, blob
	return err
}
