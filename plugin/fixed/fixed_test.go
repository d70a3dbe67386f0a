package fixed

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestResolver(t *testing.T) {
	ctx := context.Background()
	cs, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	manifest := []byte(`{"schemaVersion":2}`)
	mDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(manifest), Size: int64(len(manifest))}
	r := New("nix.local/htop:latest", mDesc, map[digest.Digest][]byte{mDesc.Digest: manifest}, cs)

	if _, _, err := r.Resolve(ctx, "nix.local/git:latest"); !errdefs.IsNotFound(err) {
		t.Errorf("another name: %v", err)
	}
	name, desc, err := r.Resolve(ctx, "nix.local/htop:latest")
	if err != nil || name != "nix.local/htop:latest" || desc.Digest != mDesc.Digest {
		t.Errorf("Resolve: %s %v %v", name, desc, err)
	}
	rc, err := r.Fetch(ctx, mDesc)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(rc); string(b) != string(manifest) {
		t.Errorf("manifest fetched as %q", b)
	}
	// Any other blob comes from the store, or is not found there.
	if _, err := r.Fetch(ctx, ocispec.Descriptor{Digest: digest.FromString("layer"), Size: 5}); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "fetch") {
		t.Errorf("a blob the store lacks: %v", err)
	}
	if _, err := r.Pusher(ctx, name); !errdefs.IsNotImplemented(err) {
		t.Errorf("Pusher: %v", err)
	}
}
