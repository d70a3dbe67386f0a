package plugin

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// defaultPath is the PATH of every image: the symlink forest puts packages'
// bin/ and sbin/ directories at /bin and /sbin.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// writeLayer streams one layer into the content store and returns its
// descriptor. ref names the ingest, so that concurrent writers of the same
// layer wait for each other instead of writing it twice at once.
func writeLayer(ctx context.Context, cs content.Store, ref string, write func(io.Writer) error) (ocispec.Descriptor, error) {
	w, err := content.OpenWriter(ctx, cs, content.WithRef(ref))
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
	// A writer killed mid-layer may have left part of it under this ref.
	if err := w.Truncate(0); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("reset content writer %s: %w", ref, err)
	}
	// The content writer sends every Write as one gRPC message: batch them.
	buf := bufio.NewWriterSize(w, 1<<20)
	m := tarstream.Measure(buf)
	if err := write(m); err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := buf.Flush(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("write layer %s: %w", ref, err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: m.Digest(), Size: m.Size()}
	if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
		return ocispec.Descriptor{}, fmt.Errorf("commit layer %s: %w", desc.Digest, err)
	}
	committed = true
	return desc, nil
}

// MediaTypeStorePaths is the media type of a reference layer: a JSON list
// of store paths that the nix snapshotter materialises. It is a layer type
// to containerd (its prefix), but no differ can apply it, so another
// snapshotter fails clearly instead of unpacking an empty layer.
const MediaTypeStorePaths = "application/vnd.oci.image.layer.nixery.store-paths.v1+json"

// referenceLayer describes store paths by identity.
func referenceLayer(paths []string) (ocispec.Descriptor, []byte, error) {
	blob, err := json.Marshal(struct {
		StorePaths []string `json:"storePaths"`
	}{paths})
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	return ocispec.Descriptor{MediaType: MediaTypeStorePaths, Digest: digest.FromBytes(blob), Size: int64(len(blob))}, blob, nil
}

// contentDescriber streams tar layers into a content store, describing
// them on the way (one read of each file). A layer the cache knows and the
// store holds is not read at all; one the store lost is written again, and
// its record is checked against the bytes written.
type contentDescriber struct {
	cs    content.Store
	cache *Cache
}

func (c contentDescriber) Describe(ctx context.Context, l *Layer) error {
	known, ok := c.cache.layer(l.identity())
	if ok {
		if _, err := c.cs.Info(ctx, known.Digest); err == nil {
			l.Desc = known
			return nil
		}
		// In another namespace the blob may exist already: a writer that
		// names the expected digest shares it instead of taking bytes.
		w, err := c.cs.Writer(ctx, content.WithRef(l.Key()), content.WithDescriptor(known))
		if errdefs.IsAlreadyExists(err) {
			l.Desc = known
			return nil
		}
		if err == nil {
			w.Close()
			_ = c.cs.Abort(ctx, l.Key())
		}
	}
	desc, err := writeLayer(ctx, c.cs, l.Key(), l.WriteTar)
	if err != nil {
		return err
	}
	layersPacked.Inc()
	bytesStreamed.Add(float64(desc.Size))
	log.G(ctx).WithFields(log.Fields{"digest": desc.Digest, "size": desc.Size}).Debug("packed layer")
	if ok && known.Digest != desc.Digest {
		log.G(ctx).WithFields(log.Fields{"recorded": known.Digest, "written": desc.Digest}).Warn("layer cache record was stale: replaced")
	}
	l.Desc = desc
	return c.cache.putLayer(l.identity(), desc)
}

// command is an image's default command: bash when it holds bash (as
// Nixery does), else the main program of the one package asked for.
func command(img resolver.Image, packages []nixbuild.Package) []string {
	if slices.Contains(img.Packages, "bashInteractive") || slices.Contains(img.Packages, "bash") {
		return []string{"bash"}
	}
	if len(img.Requested) == 1 {
		for _, p := range packages {
			if p.Name == img.Requested[0] && p.MainProgram != "" {
				return []string{p.MainProgram}
			}
		}
	}
	return nil
}

// newImage writes the config and manifest of an image of layers
// (uncompressed, so each diffID is its digest).
func newImage(img resolver.Image, packages []nixbuild.Package, layers []*Layer) (*Image, error) {
	cfg := ocispec.Image{
		Platform: ocispec.Platform{Architecture: img.Platform.Architecture, OS: img.Platform.OS},
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=" + defaultPath, "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"},
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	cfg.Config.Cmd = command(img, packages)
	blobs := map[digest.Digest][]byte{}
	var descs []ocispec.Descriptor
	for _, l := range layers {
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.Desc.Digest)
		descs = append(descs, l.Desc)
		if l.Blob != nil {
			blobs[l.Desc.Digest] = l.Blob
		}
	}
	cfgBytes, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cfgDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfgBytes), Size: int64(len(cfgBytes))}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    cfgDesc,
		Layers:    descs,
	}
	mBytes, err := json.Marshal(manifest)
	if err != nil {
		return nil, err
	}
	mDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mBytes), Size: int64(len(mBytes))}
	blobs[mDesc.Digest] = mBytes
	blobs[cfgDesc.Digest] = cfgBytes
	return &Image{Image: img, Manifest: mDesc, Config: cfgDesc, Layers: layers, Blobs: blobs}, nil
}
