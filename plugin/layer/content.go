package layer

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/pipelined"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
)

// writeLayer streams one layer into the content store and returns its
// descriptor. With an expected descriptor, a blob containerd has already
// (in any namespace) is not written again, and what is written must match
// it. Each call writes its own ingest (ref plus a random suffix): two
// clients sharing one ingest were seen to interleave their writes through
// containerd's content service, so concurrent writers of one layer each
// write it, and the second commit finds the blob there.
func writeLayer(ctx context.Context, cs content.Store, ref string, write func(io.Writer) error, expected *ocispec.Descriptor) (ocispec.Descriptor, error) {
	ref, err := unique(ref)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	opts := []content.WriterOpt{content.WithRef(ref)}
	if expected != nil {
		opts = append(opts, content.WithDescriptor(*expected))
	}
	w, err := content.OpenWriter(ctx, cs, opts...)
	if expected != nil && errdefs.IsAlreadyExists(err) {
		return *expected, nil
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("open content writer %s: %w", ref, err)
	}
	committed := false
	defer func() {
		w.Close()
		if !committed {
			_ = cs.Abort(context.WithoutCancel(ctx), ref)
		}
	}()
	// Start at 0 whatever the writer found: its offset is the client's.
	if err := w.Truncate(0); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("reset content writer %s: %w", ref, err)
	}
	// The content writer sends every Write as one gRPC message and waits
	// for containerd's answer: send large chunks, from a goroutine, so that
	// packing the next chunk overlaps containerd storing the last.
	// containerd digests what it stores and says so with every answer:
	// the layer is not hashed twice.
	pw := pipelined.New(w, 1<<20)
	if err := write(pw); err != nil {
		pw.Close()
		return ocispec.Descriptor{}, err
	}
	if err := pw.Close(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("write layer %s: %w", ref, err)
	}
	status, err := w.Status()
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("write layer %s: %w", ref, err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: w.Digest(), Size: status.Offset}
	if expected != nil && (desc.Digest != expected.Digest || desc.Size != expected.Size) {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s is %s (%d bytes), not %s (%d bytes) as described: %w",
			ref, desc.Digest, desc.Size, expected.Digest, expected.Size, errdefs.ErrFailedPrecondition)
	}
	if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
		return ocispec.Descriptor{}, fmt.Errorf("commit layer %s: %w", desc.Digest, err)
	}
	committed = true
	return desc, nil
}

// referenceLayer describes store paths by identity.
func referenceLayer(paths []string) (ocispec.Descriptor, []byte, error) {
	blob, err := json.Marshal(struct {
		StorePaths []string `json:"storePaths"`
	}{paths})
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	return ocispec.Descriptor{MediaType: labels.MediaTypeStorePaths, Digest: digest.FromBytes(blob), Size: int64(len(blob))}, blob, nil
}

// contentDescriber streams tar layers into a content store, describing
// them on the way (one read of each file). A layer the cache knows and the
// store holds is not read at all; one the store lost is written again, and
// its record is checked against the bytes written.
type contentDescriber struct {
	cs    content.Store
	cache *cache.Cache
	scope string
}

// Content describes tar layers as it writes them into cs (contentDescriber).
func Content(cs content.Store, c *cache.Cache) Describer {
	return contentDescriber{cs: cs, cache: c, scope: callerScope()}
}

// Key implements Describer: the blobs are held by the caller's lease.
// Finish implements Describer: the blobs are held by the caller's lease
// as they are written.
func (contentDescriber) Finish(context.Context) error { return nil }

// Ahead implements Describer: each layer is hashed as its blob is
// written, which only its Describe can do.
func (contentDescriber) Ahead(context.Context, []*Layer) func() { return func() {} }

func (c contentDescriber) Key() DescriberKey {
	return DescriberKey{Kind: "content/1", Layers: tarLayers, Scope: c.scope}
}

func (c contentDescriber) Describe(ctx context.Context, _ digest.Digest, l *Layer) error {
	known, ok := c.cache.Layer(l.CacheKey())
	if ok {
		if _, err := c.cs.Info(ctx, known.Digest); err == nil {
			l.Desc = known
			return nil
		}
		// In another namespace the blob may exist already: a writer that
		// names the expected digest shares it instead of taking bytes.
		desc, err := writeLayer(ctx, c.cs, l.Key(), l.WriteTar, &known)
		if err == nil {
			l.Desc = desc
			return nil
		}
		if !errdefs.IsFailedPrecondition(err) {
			return err
		}
		log.G(ctx).WithError(err).Warn("layer cache record was stale: replacing it")
	}
	desc, err := writeLayer(ctx, c.cs, l.Key(), l.WriteTar, nil)
	if err != nil {
		return err
	}
	packed(ctx, desc)
	l.Desc = desc
	return c.cache.PutLayer(l.CacheKey(), desc)
}
