package plugin

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"
)

// cacheFormat versions what layers are made of (tar format, annotations,
// forest rules): a change makes every record a miss.
const cacheFormat = "nixery-layers/1"

var (
	layersBucket = []byte("layers")
	imagesBucket = []byte("images")
)

// Cache remembers, across restarts, what was expensive to find out: the
// descriptor of each layer (so that no layer is read twice to be
// described) and the images of pinned package sources (so that a repeated
// request starts no Nix). It is an embedded bbolt database: a record is
// written in one transaction or not at all, so a process killed while
// writing leaves the previous state. Records that do not decode are
// dropped and rebuilt.
type Cache struct {
	db *bolt.DB
}

// OpenCache opens (or creates) the cache in dir. Another process holding it
// (the daemon, while the CLI builds by itself) makes this fail after
// lockWait; callers then do without.
func OpenCache(dir string, lockWait time.Duration) (*Cache, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	db, err := bolt.Open(filepath.Join(dir, "cache.db"), 0o600, &bolt.Options{Timeout: lockWait})
	if err != nil {
		return nil, fmt.Errorf("cache %s: %w", dir, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{layersBucket, imagesBucket} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("cache %s: %w", dir, err)
	}
	return &Cache{db: db}, nil
}

// Close closes the cache; a nil Cache is a no-op.
func (c *Cache) Close() error {
	if c == nil {
		return nil
	}
	return c.db.Close()
}

func cacheKey(parts ...string) []byte {
	d := digest.Canonical.Digester()
	d.Hash().Write([]byte(cacheFormat))
	for _, p := range parts {
		d.Hash().Write([]byte{0})
		d.Hash().Write([]byte(p))
	}
	return []byte(d.Digest().Encoded())
}

// layer returns the remembered descriptor of the layer with key.
func (c *Cache) layer(key []byte) (ocispec.Descriptor, bool) {
	var desc ocispec.Descriptor
	if c == nil {
		return desc, false
	}
	if !c.get(layersBucket, key, &desc) {
		cacheLookups.WithLabelValues("layer", "miss").Inc()
		return desc, false
	}
	cacheLookups.WithLabelValues("layer", "hit").Inc()
	if desc.Digest.Validate() != nil || desc.Size <= 0 || desc.MediaType == "" {
		c.drop(layersBucket, key)
		return ocispec.Descriptor{}, false
	}
	return desc, true
}

func (c *Cache) putLayer(key []byte, desc ocispec.Descriptor) error {
	if c == nil {
		return nil
	}
	desc.Annotations = nil
	return c.put(layersBucket, key, desc)
}

// get decodes the record at key into v; a record that does not decode is
// dropped.
func (c *Cache) get(bucket, key []byte, v any) bool {
	var raw []byte
	_ = c.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bucket).Get(key); b != nil {
			raw = append([]byte(nil), b...)
		}
		return nil
	})
	if raw == nil {
		return false
	}
	if err := json.Unmarshal(raw, v); err != nil {
		c.drop(bucket, key)
		return false
	}
	return true
}

func (c *Cache) put(bucket, key []byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put(key, b) })
}

func (c *Cache) drop(bucket, key []byte) {
	_ = c.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete(key) })
}

// imageRecord is a cached image of a pinned source.
type imageRecord struct {
	Manifest      ocispec.Descriptor `json:"manifest"`
	ManifestBytes []byte             `json:"manifestBytes"`
	Config        ocispec.Descriptor `json:"config"`
	ConfigBytes   []byte             `json:"configBytes"`
	Layers        []layerRecord      `json:"layers"`
}

type layerRecord struct {
	Desc     ocispec.Descriptor `json:"desc"`
	Paths    []string           `json:"paths"`
	Hashes   []string           `json:"hashes"`
	Symlinks bool               `json:"symlinks,omitempty"`
}

func (c *Cache) image(key []byte) (imageRecord, bool) {
	var rec imageRecord
	if c == nil {
		return rec, false
	}
	if !c.get(imagesBucket, key, &rec) {
		cacheLookups.WithLabelValues("image", "miss").Inc()
		return rec, false
	}
	cacheLookups.WithLabelValues("image", "hit").Inc()
	if digest.FromBytes(rec.ManifestBytes) != rec.Manifest.Digest || digest.FromBytes(rec.ConfigBytes) != rec.Config.Digest || len(rec.Layers) == 0 {
		c.drop(imagesBucket, key)
		return imageRecord{}, false
	}
	return rec, true
}

func (c *Cache) putImage(key []byte, img *Image) error {
	if c == nil {
		return nil
	}
	rec := imageRecord{
		Manifest: img.Manifest, ManifestBytes: img.Blobs[img.Manifest.Digest],
		Config: img.Config, ConfigBytes: img.Blobs[img.Config.Digest],
	}
	for _, l := range img.Layers {
		rec.Layers = append(rec.Layers, layerRecord{Desc: l.Desc, Paths: l.Paths, Hashes: l.Hashes, Symlinks: l.Symlinks})
	}
	return c.put(imagesBucket, key, rec)
}
