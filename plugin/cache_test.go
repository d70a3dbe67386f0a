package plugin

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"
)

func testLayer(t *testing.T) *Layer {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "nix", "store", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-pkg")
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "pkg"), []byte("program"), 0o555); err != nil {
		t.Fatal(err)
	}
	return &Layer{Paths: []string{dir}, Hashes: []string{"sha256-x"}}
}

func TestCacheLayerRecords(t *testing.T) {
	ctx := context.Background()
	cache, err := OpenCache(t.TempDir(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	cs, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	l := testLayer(t)

	// A stale record (the blob is not in the store, and the bytes say
	// otherwise) is checked against what is written, and replaced.
	stale := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString("stale"), Size: 5}
	if err := cache.putLayer(l.identity(), stale); err != nil {
		t.Fatal(err)
	}
	if err := newContentDescriber(cs, cache).Describe(ctx, "", l); err != nil {
		t.Fatal(err)
	}
	if l.Desc.Digest == stale.Digest {
		t.Fatal("the stale record was trusted")
	}
	if _, err := cs.Info(ctx, l.Desc.Digest); err != nil {
		t.Errorf("layer not written: %v", err)
	}
	if rec, ok := cache.layer(l.identity()); !ok || rec.Digest != l.Desc.Digest {
		t.Errorf("record %v, %v after a stale one was found", rec, ok)
	}

	// Another layer identity (same paths, other NAR hash) is a miss.
	other := &Layer{Paths: l.Paths, Hashes: []string{"sha256-y"}}
	if _, ok := cache.layer(other.identity()); ok {
		t.Error("a path with another NAR hash hit the cache")
	}

	// A record that does not decode is dropped, not served.
	cache.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(layersBucket).Put(l.identity(), []byte("{garbage")) })
	if _, ok := cache.layer(l.identity()); ok {
		t.Error("a corrupt record was served")
	}
	cache.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(layersBucket).Get(l.identity()) != nil {
			t.Error("a corrupt record was kept")
		}
		return nil
	})

	// Records survive reopening.
	if err := cache.putLayer(l.identity(), l.Desc); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(cache.db.Path())
	cache.Close()
	cache, err = OpenCache(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rec, ok := cache.layer(l.identity()); !ok || rec.Digest != l.Desc.Digest {
		t.Errorf("after reopening: %v, %v", rec, ok)
	}

	// Held by another process, the cache is not waited for forever.
	if _, err := OpenCache(dir, 100*time.Millisecond); err == nil {
		t.Error("opened a cache another handle holds")
	}
}
