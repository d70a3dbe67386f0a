package plugin

import (
	"encoding/json"
	"maps"
	"slices"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// defaultPath is the PATH of every image: the symlink forest puts packages'
// bin/ and sbin/ directories at /bin and /sbin.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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

// imageConfig is the config of an image of packages run as user, its
// layers aside.
func imageConfig(img resolver.Image, packages []nixbuild.Package, user tarstream.User) ocispec.Image {
	cfg := ocispec.Image{
		Platform: ocispec.Platform{Architecture: img.Platform.Architecture, OS: img.Platform.OS},
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=" + defaultPath, "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"},
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	cfg.Config.Cmd = command(img, packages)
	if !user.Root() {
		// HOME too: runtimes set it from /etc/passwd, but not all.
		cfg.Config.User = user.Spec()
		cfg.Config.Env = append(cfg.Config.Env, "HOME="+user.Home())
	}
	return cfg
}

// newImage writes the config and manifest of an image of described layers
// (uncompressed, so each diffID is its digest), which it annotates with
// their store paths or symlinks.
func newImage(img resolver.Image, cfg ocispec.Image, layers []*layer.Layer) (*Image, error) {
	cfg.RootFS.DiffIDs = nil
	blobs := map[digest.Digest][]byte{}
	var descs []ocispec.Descriptor
	for _, l := range layers {
		// containerd's unpacker labels a layer's snapshot with its
		// containerd.io/snapshot/ annotations: the nix snapshotter then
		// makes it, and a pull straight into snapshots finds it, whoever
		// unpacked it.
		l.Desc.Annotations = layer.Annotations(l, l.Desc)
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
	return &Image{Image: img, Manifest: mDesc, Config: cfgDesc, Layers: layers, Blobs: blobs, Target: mDesc}, nil
}

// newIndex is image mine of all, under the image index of all.
func newIndex(mine *Image, all []*Image) (*Image, error) {
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	out := *mine
	out.Blobs = map[digest.Digest][]byte{}
	out.Others = nil
	for _, img := range all {
		d := img.Manifest
		d.Platform = &ocispec.Platform{OS: img.Platform.OS, Architecture: img.Platform.Architecture}
		index.Manifests = append(index.Manifests, d)
		maps.Copy(out.Blobs, img.Blobs)
		if img != mine {
			out.Others = append(out.Others, img)
		}
	}
	b, err := json.Marshal(index)
	if err != nil {
		return nil, err
	}
	out.Target = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(b), Size: int64(len(b))}
	out.Blobs[out.Target.Digest] = b
	return &out, nil
}
