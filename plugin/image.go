package plugin

import (
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

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/pipelined"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
)

// defaultPath is the PATH of every image: the symlink forest puts packages'
// bin/ and sbin/ directories at /bin and /sbin.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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

func newContentDescriber(cs content.Store, c *cache.Cache) contentDescriber {
	return contentDescriber{cs: cs, cache: c, scope: callerScope()}
}

// Key implements Describer: the blobs are held by the caller's lease.
// Finish implements Describer: the blobs are held by the caller's lease
// as they are written.
func (contentDescriber) Finish(context.Context) error { return nil }

func (c contentDescriber) Key() DescriberKey {
	return DescriberKey{Kind: "content/1", Layers: tarLayers, Scope: c.scope}
}

func (c contentDescriber) Describe(ctx context.Context, _ digest.Digest, l *Layer) error {
	known, ok := c.cache.Layer(l.cacheKey())
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
	return c.cache.PutLayer(l.cacheKey(), desc)
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

// imageConfig is the config of an image of packages, its layers aside.
func imageConfig(img resolver.Image, packages []nixbuild.Package) ocispec.Image {
	cfg := ocispec.Image{
		Platform: ocispec.Platform{Architecture: img.Platform.Architecture, OS: img.Platform.OS},
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=" + defaultPath, "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"},
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	cfg.Config.Cmd = command(img, packages)
	return cfg
}

// newImage writes the config and manifest of an image of described layers
// (uncompressed, so each diffID is its digest), which it annotates with
// their store paths or symlinks.
func newImage(img resolver.Image, cfg ocispec.Image, layers []*Layer) (*Image, error) {
	cfg.RootFS.DiffIDs = nil
	blobs := map[digest.Digest][]byte{}
	var descs []ocispec.Descriptor
	for _, l := range layers {
		// containerd's unpacker labels a layer's snapshot with its
		// containerd.io/snapshot/ annotations: the nix snapshotter then
		// makes it, and a pull straight into snapshots finds it, whoever
		// unpacked it.
		l.Desc.Annotations = layerAnnotations(l, l.Desc)
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
