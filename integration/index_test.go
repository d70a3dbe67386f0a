package integration

import (
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// With [image] platforms a reference is an image index, one image per
// platform, each of its platform's derivations: pull registers it and the
// node's image runs, ctr pulls it through the endpoint and runs it, and
// its arm64 image names aarch64-linux store paths.
func TestPullIndex(t *testing.T) {
	e := newNixEnv(t, func(e *env) { e.extraImage = map[string]any{"platforms": []string{"linux/amd64", "linux/arm64"}} })
	const ref = "nix.local/shell/htop"
	dgst := e.mustPull("--snapshotter", "overlayfs", ref)
	_, rec := e.manifest(t, ref+":latest")
	if rec.Target.MediaType != ocispec.MediaTypeImageIndex || rec.Target.Digest.String() != dgst {
		t.Errorf("record target %+v, pull printed %s", rec.Target, dgst)
	}
	if out := e.runOn("overlayfs", ref, "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}

	// The nix snapshotter's registration (containerd's pull) takes it too
	// (another index: its layers are store-path references).
	e.mustPull("--snapshotter", "nix", ref)
	if _, rec := e.manifest(t, ref+":latest"); rec.Target.MediaType != ocispec.MediaTypeImageIndex {
		t.Errorf("record target on nix %+v", rec.Target)
	}
	if out := e.runOn("nix", ref, "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version on nix printed %q", out)
	}

	// The endpoint serves the overlayfs pull's index (tar layers); its
	// arm64 image is of aarch64 derivations.
	served, body := e.fetchManifest(t, "shell/htop", "latest")
	if served.String() != dgst {
		t.Errorf("the endpoint serves %s, pull registered %s", served, dgst)
	}
	var index ocispec.Index
	if err := json.Unmarshal(body, &index); err != nil || len(index.Manifests) != 2 {
		t.Fatalf("index %s: %v", body, err)
	}
	for _, m := range index.Manifests {
		if m.Platform.Architecture != "arm64" {
			continue
		}
		resp, err := http.Get("http://" + e.daemon.http + "/v2/shell/htop/manifests/" + m.Digest.String())
		if err != nil {
			t.Fatal(err)
		}
		var manifest ocispec.Manifest
		err = json.NewDecoder(resp.Body).Decode(&manifest)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		checkBuiltFor(t, manifest, "aarch64-linux")
	}

	// Export and push carry the index, every platform's blobs, under the
	// digest the endpoint serves; the registry's tag names the index.
	file := filepath.Join(t.TempDir(), "index.tar")
	e.cli("export", ref, file)
	if raw := skopeo(t, "inspect", "--raw", "oci-archive:"+file); digest.FromBytes(raw) != served {
		t.Errorf("the archive's index is %s, the endpoint's %s", digest.FromBytes(raw), served)
	}
	skopeo(t, "copy", "--all", "oci-archive:"+file, "oci:"+filepath.Join(t.TempDir(), "layout")+":x")
	dest := startRegistry(t) + "/tools/htop:multi"
	e.cli("push", "--plain-http", ref, dest)
	if raw := skopeo(t, "inspect", "--tls-verify=false", "--raw", "docker://"+dest); digest.FromBytes(raw) != served {
		t.Errorf("the registry's tag names %s, the endpoint's index is %s", digest.FromBytes(raw), served)
	}
	skopeo(t, "copy", "--all", "--src-tls-verify=false", "docker://"+dest, "oci:"+filepath.Join(t.TempDir(), "layout")+":x")

	// A client that picks the platform itself: ctr, through the endpoint.
	e.removeImages(t, ref)
	e.ctrPull("overlayfs", ref+":latest")
	if out := e.runOn("overlayfs", ref+":latest", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version after ctr pull printed %q", out)
	}
}
