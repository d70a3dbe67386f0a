package layer

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// tarDescriptor describes l's tar by reading it.
func tarDescriptor(t testing.TB, l *Layer) ocispec.Descriptor {
	t.Helper()
	m := tarstream.Measure(io.Discard)
	if err := l.WriteTar(m); err != nil {
		t.Fatal(err)
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: m.Digest(), Size: m.Size()}
}

func testLayer(t testing.TB) *Layer {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "nix", "store", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-pkg")
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "pkg"), []byte("program"), 0o555); err != nil {
		t.Fatal(err)
	}
	// As Nix keeps its store.
	for _, p := range []string{filepath.Join(dir, "bin", "pkg"), filepath.Join(dir, "bin"), dir} {
		if err := os.Chtimes(p, tarstream.Epoch, tarstream.Epoch); err != nil {
			t.Fatal(err)
		}
	}
	return &Layer{Paths: []string{dir}, Hashes: []string{"sha256-x"}}
}

// A stale layer record (the blob is not in the store, and the bytes say
// otherwise) is checked against what is written, and replaced.
func TestContentDescriberStaleRecord(t *testing.T) {
	ctx := context.Background()
	layers := testutil.Cache(t)
	cs, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	l := testLayer(t)
	stale := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString("stale"), Size: 5}
	if err := layers.PutLayer(l.CacheKey(), stale); err != nil {
		t.Fatal(err)
	}
	if err := Content(cs, layers).Describe(ctx, "", l); err != nil {
		t.Fatal(err)
	}
	if l.Desc.Digest == stale.Digest {
		t.Fatal("the stale record was trusted")
	}
	if _, err := cs.Info(ctx, l.Desc.Digest); err != nil {
		t.Errorf("layer not written: %v", err)
	}
	if rec, ok := layers.Layer(l.CacheKey()); !ok || rec.Digest != l.Desc.Digest {
		t.Errorf("record %v, %v after a stale one was found", rec, ok)
	}
}
