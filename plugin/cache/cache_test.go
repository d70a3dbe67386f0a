package cache

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"
)

func TestLayerRecords(t *testing.T) {
	cache, err := Open(t.TempDir(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	k := LayerKey{Paths: []string{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-pkg"}, Hashes: []string{"sha256-x"}}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString("layer"), Size: 5,
		Annotations: map[string]string{"a": "b"}}
	if _, ok := cache.Layer(k); ok {
		t.Error("an empty cache hit")
	}
	if err := cache.PutLayer(k, desc); err != nil {
		t.Fatal(err)
	}
	if got, ok := cache.Layer(k); !ok || got.Digest != desc.Digest || got.Annotations != nil {
		t.Errorf("record %v, %v", got, ok)
	}
	// Another NAR hash, or the symlink layer of the same paths, is another
	// layer.
	for _, other := range []LayerKey{{Paths: k.Paths, Hashes: []string{"sha256-y"}}, {Symlinks: true, Paths: k.Paths, Hashes: k.Hashes}} {
		if _, ok := cache.Layer(other); ok {
			t.Errorf("%+v hit the record of %+v", other, k)
		}
	}

	// A record that does not decode is dropped, not served.
	dbKey := key("layer", k)
	cache.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(layersBucket).Put(dbKey, []byte("{garbage")) })
	if _, ok := cache.Layer(k); ok {
		t.Error("a corrupt record was served")
	}
	cache.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(layersBucket).Get(dbKey) != nil {
			t.Error("a corrupt record was kept")
		}
		return nil
	})

	// Records survive reopening.
	if err := cache.PutLayer(k, desc); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(cache.db.Path())
	cache.Close()
	cache, err = Open(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := cache.Layer(k); !ok || got.Digest != desc.Digest {
		t.Errorf("after reopening: %v, %v", got, ok)
	}

	// Held by another process, the cache is not waited for forever.
	if _, err := Open(dir, 100*time.Millisecond); err == nil {
		t.Error("opened a cache another handle holds")
	}
}

func TestImageRecords(t *testing.T) {
	cache, err := Open(t.TempDir(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	manifest, config := []byte(`{"manifest":1}`), []byte(`{"config":1}`)
	rec := Image{
		Manifest: ocispec.Descriptor{Digest: digest.FromBytes(manifest), Size: int64(len(manifest))}, ManifestBytes: manifest,
		Config: ocispec.Descriptor{Digest: digest.FromBytes(config), Size: int64(len(config))}, ConfigBytes: config,
		Layers: []Layer{{Desc: ocispec.Descriptor{Digest: digest.FromString("l")}, LayerKey: LayerKey{Paths: []string{"/nix/store/x"}}}},
	}
	k := ImageKey{Source: "git:https://example.org/pkgs", System: "x86_64-linux", Tag: "abc", Packages: []string{"cacert", "htop"},
		Requested: []string{"htop"}, Layers: "tar/1", MaxLayers: 20, Layering: "auto"}
	if err := cache.PutImage(k, rec); err != nil {
		t.Fatal(err)
	}
	if got, ok := cache.Image(k); !ok || got.Manifest.Digest != rec.Manifest.Digest || len(got.Layers) != 1 || got.Layers[0].Paths[0] != "/nix/store/x" {
		t.Errorf("image record %+v, %v", got, ok)
	}
	// Every value of the key counts: another grouping is another image.
	other := k
	other.Layering = "nixery"
	if _, ok := cache.Image(other); ok {
		t.Error("an image of another layering hit")
	}
	// A record whose bytes do not match its digests is dropped.
	bad := rec
	bad.ManifestBytes = []byte("tampered")
	cache.PutImage(k, bad)
	if _, ok := cache.Image(k); ok {
		t.Error("a record whose manifest does not match its digest was served")
	}
}
