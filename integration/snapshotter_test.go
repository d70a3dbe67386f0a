package integration

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// runOn runs a container of image on snapshotter and returns its stdout.
func (e *env) runOn(snapshotter, image string, args ...string) string {
	e.t.Helper()
	return e.run("--snapshotter="+snapshotter, append([]string{image}, args...)...)
}

func TestNixSnapshotter(t *testing.T) {
	e := newNixEnv(t)
	e.mustPull("--snapshotter", "nix", "nix.local/shell/htop")
	if out := e.runOn("nix", "nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}
	// The container's store holds what the image's layers name.
	m, _ := e.manifest(t, "nix.local/shell/htop:latest")
	closure := map[string]bool{}
	for _, l := range m.Layers {
		for _, p := range storePaths(l.Annotations) {
			closure[p] = true
		}
	}
	if out, want := e.runOn("nix", "nix.local/shell/htop", "bash", "-c", "echo ok > /tmp/x && cat /tmp/x && ls /nix/store | wc -l"), fmt.Sprintf("ok\n%d\n", len(closure)); out != want {
		t.Errorf("shell printed %q, want %q", out, want)
	}

	// Store-path layers are references and the symlink layer is made by
	// the snapshotter too: no layer blob was written.
	var refs int
	for _, l := range m.Layers {
		if _, err := e.ctd.Client.ContentStore().Info(e.ctx(), l.Digest); !errdefs.IsNotFound(err) {
			t.Errorf("layer %s is in the content store (%v)", l.Digest, err)
		}
		if len(storePaths(l.Annotations)) > 0 {
			refs++
			if l.MediaType != labels.MediaTypeStorePaths {
				t.Errorf("layer %s has media type %s", l.Digest, l.MediaType)
			}
		} else if len(symlinkPaths(l.Annotations)) == 0 {
			t.Errorf("layer %s names neither store paths nor symlinks", l.Digest)
		}
	}
	if refs < 2 {
		t.Errorf("%d store-path layers", refs)
	}

	// --with-layers writes full layers, which other snapshotters unpack too.
	e.mustPull("--snapshotter", "nix", "--with-layers", "nix.local/git")
	m, _ = e.manifest(t, "nix.local/git:latest")
	for _, l := range m.Layers {
		if _, err := e.ctd.Client.ContentStore().Info(e.ctx(), l.Digest); err != nil {
			t.Errorf("--with-layers: layer %s: %v", l.Digest, err)
		}
	}
	if out := e.runOn("nix", "nix.local/git", "git", "--version"); !strings.Contains(out, "git version") {
		t.Errorf("git on nix: %q", out)
	}
	if out := e.runOn("overlayfs", "nix.local/git", "git", "--version"); !strings.Contains(out, "git version") {
		t.Errorf("git on overlayfs: %q", out)
	}
}

// An image that knows nothing of Nix runs on the nix snapshotter as on overlayfs.
func TestNixSnapshotterOrdinaryImage(t *testing.T) {
	e := newNixEnv(t)
	archive := ordinaryImage(t)
	out, err := e.ctd.Ctr(t.Context(), "--namespace", "default", "images", "import", "--snapshotter", "nix", archive).CombinedOutput()
	if err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	if out := e.runOn("nix", "example.org/ordinary:1", "bash", "-c", "echo ordinary $((6*7))"); out != "ordinary 42\n" {
		t.Errorf("printed %q", out)
	}
}

// ordinaryImage writes an OCI archive of bash's closure in one plain layer,
// without store-path annotations.
func ordinaryImage(t *testing.T) string {
	t.Helper()
	return ociArchive(t, "example.org/ordinary:1", bashLayers(t))
}

// archiveLayer is a layer of an OCI archive and its manifest annotations.
type archiveLayer struct {
	data        []byte
	annotations map[string]string
}

// bashLayers are the layers of an image that runs bash: its closure, and
// its symlink forest.
func bashLayers(t *testing.T) []archiveLayer {
	t.Helper()
	bash, err := exec.Command("nix-build", append([]string{"--no-out-link", "-A", "bashInteractive", testutil.TestPkgs()}, nixOptionArgs()...)...).Output()
	if err != nil {
		t.Fatal(err)
	}
	bashPath := strings.TrimSpace(string(bash))
	closure, err := exec.Command("nix-store", "--query", "--requisites", bashPath).Output()
	if err != nil {
		t.Fatal(err)
	}
	var layer bytes.Buffer
	if err := tarstream.WriteStorePaths(&layer, strings.Fields(string(closure))); err != nil {
		t.Fatal(err)
	}
	var forest bytes.Buffer
	if err := tarstream.WriteSymlinkForest(&forest, []string{bashPath}); err != nil {
		t.Fatal(err)
	}
	return []archiveLayer{{data: layer.Bytes()}, {data: forest.Bytes()}}
}

// ociArchive writes an OCI archive of one image, named name, of layers.
func ociArchive(t *testing.T, name string, layers []archiveLayer) string {
	t.Helper()
	blobs := map[digest.Digest][]byte{}
	add := func(mediaType string, b []byte) ocispec.Descriptor {
		d := digest.FromBytes(b)
		blobs[d] = b
		return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(b))}
	}
	var descs []ocispec.Descriptor
	var diffIDs []digest.Digest
	for _, l := range layers {
		desc := add(ocispec.MediaTypeImageLayer, l.data)
		desc.Annotations = l.annotations
		descs = append(descs, desc)
		diffIDs = append(diffIDs, desc.Digest)
	}
	cfg, _ := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   ocispec.ImageConfig{Env: []string{"PATH=/bin"}},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	})
	manifest, _ := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    add(ocispec.MediaTypeImageConfig, cfg),
		Layers:    descs,
	})
	mdesc := add(ocispec.MediaTypeImageManifest, manifest)
	mdesc.Annotations = map[string]string{ocispec.AnnotationRefName: name}
	mdesc.Platform = &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	index, _ := json.Marshal(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{mdesc}})

	path := filepath.Join(t.TempDir(), "image.tar")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	write := func(name string, b []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg})
		tw.Write(b)
	}
	write(ocispec.ImageLayoutFile, []byte(`{"imageLayoutVersion":"1.0.0"}`))
	write("index.json", index)
	for d, b := range blobs {
		write("blobs/sha256/"+d.Encoded(), b)
	}
	tw.Close()
	f.Close()
	return path
}

func TestNixSnapshotterGC(t *testing.T) {
	e := newNixEnv(t)
	e.mustPull("--snapshotter", "nix", "nix.local/shell/htop")
	m, _ := e.manifest(t, "nix.local/shell/htop:latest")
	var paths []string
	for _, l := range m.Layers {
		paths = append(paths, storePaths(l.Annotations)...)
	}

	// The snapshots' store paths are GC roots: a collection keeps them.
	if out, err := exec.Command("nix-store", "--gc").CombinedOutput(); err != nil {
		t.Fatalf("nix-store --gc: %v\n%s", err, out)
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s collected: %v", p, err)
		}
	}
	if out := e.runOn("nix", "nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("after nix-store --gc: %q", out)
	}
	roots, _ := os.ReadDir(e.daemon.gcRoots)
	if len(roots) == 0 {
		t.Fatal("no GC roots")
	}
	// One directory of roots per layer containerd has: none held by a
	// layer made ahead of it (prefilled) that it did not take.
	if sn := e.snapshots("nix"); len(roots) != len(sn) {
		t.Errorf("%d directories of GC roots for %d snapshots", len(roots), len(sn))
	}

	// Without the image, containerd's GC removes the snapshots, and with
	// them the roots.
	out, err := e.ctd.Ctr(t.Context(), "--namespace", "default", "images", "rm", "--sync", "nix.local/shell/htop", "nix.local/shell/htop:latest").CombinedOutput()
	if err != nil {
		t.Fatalf("images rm: %v\n%s", err, out)
	}
	roots, _ = os.ReadDir(e.daemon.gcRoots)
	if len(roots) != 0 {
		t.Errorf("%d GC roots left after the image was removed", len(roots))
	}
	printed, _ := exec.Command("nix-store", "--gc", "--print-roots").Output()
	if strings.Contains(string(printed), e.daemon.gcRoots) {
		t.Errorf("Nix still sees roots in %s", e.daemon.gcRoots)
	}
}

func TestNixSnapshotterRestart(t *testing.T) {
	e := newNixEnv(t)
	e.mustPull("--snapshotter", "nix", "nix.local/shell/htop")
	// containerd restarted under a running daemon: containerd reconnects
	// to the snapshotter's socket by itself, and pulls and runs go on.
	e.ctd.Restart(t)
	e.mustPull("--snapshotter", "nix", "nix.local/git")
	if out := e.runOn("nix", "nix.local/git", "git", "--version"); !strings.Contains(out, "git version") {
		t.Errorf("after a containerd restart: %q", out)
	}
	e.daemon.stop()
	e.ctd.Restart(t)
	e.daemon.start(e.config)
	if out := e.runOn("nix", "nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("after restarts: %q", out)
	}

	// A daemon killed outright leaves a socket behind; the next one starts
	// over it, and pulls work.
	e.daemon.stop(9)
	if _, err := os.Stat(e.daemon.address); err != nil {
		t.Fatalf("no stale socket to test with: %v", err)
	}
	e.daemon.start(e.config)
	e.mustPull("--snapshotter", "nix", "nix.local/git")
	if out := e.runOn("nix", "nix.local/git", "git", "--version"); !strings.Contains(out, "git version") {
		t.Errorf("after a killed daemon: %q", out)
	}
}
