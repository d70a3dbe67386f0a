package layer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

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

// Ahead implements Describer: every layer is hashed.
func (h hashDescriber) Ahead(ctx context.Context, layers []*Layer) func() {
	return hashAhead(ctx, h.cache, layers)
}

func (h hashDescriber) Describe(ctx context.Context, _ digest.Digest, l *Layer) error {
	desc, err := digestOf(ctx, h.cache, l)
	l.Desc = desc
	return err
}

// hashing joins those that ask for the digest of one layer at once (an
// image's describer and its Ahead; the builds of images that share the
// layer), by the layer's cache key (hashKey).
var hashing singleflight.Group

// hashKey keys l in hashing.
func hashKey(l *Layer) string { return fmt.Sprint(l.CacheKey()) }

// digestOf describes tar layer l from the cache, or by streaming it once
// through sha256 (stopping when ctx ends) and remembering the result:
// once, however many ask at once. One whose caller gave up (its context
// ended) is not the failure of those that joined it: they hash for
// themselves.
func digestOf(ctx context.Context, c *cache.Cache, l *Layer) (ocispec.Descriptor, error) {
	for {
		ch := hashing.DoChan(hashKey(l), func() (any, error) { return hashLayer(ctx, c, l) })
		var r singleflight.Result
		select {
		case r = <-ch:
		case <-ctx.Done():
			return ocispec.Descriptor{}, ctx.Err()
		}
		if r.Err != nil && r.Shared && ctx.Err() == nil && (errors.Is(r.Err, context.Canceled) || errors.Is(r.Err, context.DeadlineExceeded)) {
			continue
		}
		desc, _ := r.Val.(ocispec.Descriptor)
		return desc, r.Err
	}
}

// aheadSlots bounds the layers hashed ahead at once, by every build of
// this process: a core each.
var aheadSlots = make(chan struct{}, runtime.GOMAXPROCS(0))

// hashAhead hashes layers (those the cache does not know) beside each
// other, bottom first, as a describer's Ahead; stop ends it and waits for
// it, and for the hashing of the layers it joined. What fails here is the
// Describe's to report: it hashes the layer again.
func hashAhead(ctx context.Context, c *cache.Cache, layers []*Layer) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		var each sync.WaitGroup
		defer each.Wait()
		for _, l := range layers {
			if c.HasLayer(l.CacheKey()) {
				continue
			}
			select {
			case aheadSlots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			each.Go(func() {
				defer func() { <-aheadSlots }()
				_, _, _ = hashing.Do(hashKey(l), func() (any, error) { return hashLayer(ctx, c, l) })
			})
		}
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

// hashLayer is digestOf, alone.
func hashLayer(ctx context.Context, c *cache.Cache, l *Layer) (ocispec.Descriptor, error) {
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

// Ahead implements Describer: next describes the symlink layer.
func (r referenceDescriber) Ahead(ctx context.Context, layers []*Layer) func() {
	var symlinks []*Layer
	for _, l := range layers {
		if l.Symlinks {
			symlinks = append(symlinks, l)
		}
	}
	return r.next.Ahead(ctx, symlinks)
}

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
