package plugin

import (
	"bytes"
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
)

// Content is img as a content store that holds its blobs (and, for an
// index, those of every image of it), for what takes
// one (containerd's exporter and pusher): manifest and config from memory,
// tar layers re-made from the store as they are read — the bytes the
// endpoint serves. The caller holds img's store paths while it reads.
func (img *Image) Content() content.InfoReaderProvider { return imageContent{img} }

type imageContent struct{ img *Image }

func (c imageContent) Info(_ context.Context, d digest.Digest) (content.Info, error) {
	if b, ok := c.img.Blobs[d]; ok {
		return content.Info{Digest: d, Size: int64(len(b))}, nil
	}
	if l := c.layer(d); l != nil {
		return content.Info{Digest: d, Size: l.Desc.Size}, nil
	}
	return content.Info{}, fmt.Errorf("blob %s of %s: %w", d, c.img.Ref(), errdefs.ErrNotFound)
}

func (c imageContent) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	if b, ok := c.img.Blobs[desc.Digest]; ok {
		return bytesReaderAt{bytes.NewReader(b)}, nil
	}
	if l := c.layer(desc.Digest); l != nil {
		return layer.ReaderAt(ctx, l), nil
	}
	return nil, fmt.Errorf("blob %s of %s: %w", desc.Digest, c.img.Ref(), errdefs.ErrNotFound)
}

// layer is the layer with digest d, not held in memory, of the image or
// of another image of its index.
func (c imageContent) layer(d digest.Digest) *layer.Layer {
	for _, img := range c.img.Images() {
		for _, l := range img.Layers {
			if l.Desc.Digest == d && l.Blob == nil {
				return l
			}
		}
	}
	return nil
}

type bytesReaderAt struct{ *bytes.Reader }

func (bytesReaderAt) Close() error { return nil }
