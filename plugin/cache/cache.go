// Package cache remembers, across restarts, what was expensive to find
// out: the descriptor of each layer (so that no layer is read twice to be
// described) and the images of pinned package sources (so that a repeated
// request starts no Nix). Records are keyed by explicit values (LayerKey,
// ImageKey), versioned by format: what a record depends on is written
// down, not derived from Go type names.
package cache

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	bolt "go.etcd.io/bbolt"
)

// format versions what layers and images are made of (tar format,
// annotations, forest rules) and how keys are written: a change makes
// every record a miss.
const format = "nixery-cache/2"

var (
	layersBucket = []byte("layers")
	imagesBucket = []byte("images")
)

var lookups = promauto.NewCounterVec(prometheus.CounterOpts{
	Namespace: "nixery", Name: "cache_lookups_total",
	Help: "Cache lookups by kind (layer, image) and result (hit, miss).",
}, []string{"kind", "result"})

// LayerKey is what a layer's bytes depend on: its store paths (or, for
// the symlink layer, the packages' outputs in image order) and their NAR
// hashes (a path rebuilt differently has another hash).
type LayerKey struct {
	Symlinks bool     `json:"symlinks"`
	Paths    []string `json:"paths"`
	Hashes   []string `json:"hashes"`
	// User is the image user whose accounts a symlink layer holds
	// (tarstream.User's String), "" for root: keys of root's layers are
	// what they were before users.
	User string `json:"user,omitempty"`
}

// ImageKey is what an image of a pinned package source depends on.
type ImageKey struct {
	Source string `json:"source"`
	// Pin is what fixes an unpinned source's package set (a store path, a
	// commit), when something does.
	Pin       string   `json:"pin,omitempty"`
	System    string   `json:"system"`
	Tag       string   `json:"tag"`
	Packages  []string `json:"packages"`
	Requested []string `json:"requested"`
	// Layers is what its layer descriptors are (with a version): tar
	// layers, or store-path references.
	Layers    string `json:"layers"`
	MaxLayers int    `json:"maxLayers"`
	// Layering is the grouping's options (layering.Identity).
	Layering string `json:"layering"`
	// User is whom the image runs as, as LayerKey.User.
	User string `json:"user,omitempty"`
}

// key is the database key of a record of kind with key value v.
func key(kind string, v any) []byte {
	b, _ := json.Marshal(v) // structs of strings and ints: cannot fail
	d := digest.Canonical.Digester()
	d.Hash().Write([]byte(format + "\x00" + kind + "\x00"))
	d.Hash().Write(b)
	return []byte(d.Digest().Encoded())
}

// Image is the record of a cached image.
type Image struct {
	Manifest      ocispec.Descriptor `json:"manifest"`
	ManifestBytes []byte             `json:"manifestBytes"`
	Config        ocispec.Descriptor `json:"config"`
	ConfigBytes   []byte             `json:"configBytes"`
	Layers        []Layer            `json:"layers"`
}

// Layer is a layer of a cached image.
type Layer struct {
	Desc ocispec.Descriptor `json:"desc"`
	LayerKey
}

// Cache is an embedded bbolt database: a record is written in one
// transaction or not at all, so a process killed while writing leaves the
// previous state. Records that do not decode are dropped and rebuilt. A
// nil Cache remembers nothing.
type Cache struct {
	db *bolt.DB
}

// Open opens (or creates) the cache in dir. Another process holding it
// makes this fail after lockWait; callers then do without.
func Open(dir string, lockWait time.Duration) (*Cache, error) {
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

// Close closes the cache.
func (c *Cache) Close() error {
	if c == nil {
		return nil
	}
	return c.db.Close()
}

// Layer returns the remembered descriptor of the layer k.
func (c *Cache) Layer(k LayerKey) (ocispec.Descriptor, bool) {
	var desc ocispec.Descriptor
	if c == nil {
		return desc, false
	}
	dbKey := key("layer", k)
	if !c.get(layersBucket, dbKey, &desc) {
		lookups.WithLabelValues("layer", "miss").Inc()
		return desc, false
	}
	lookups.WithLabelValues("layer", "hit").Inc()
	if desc.Digest.Validate() != nil || desc.Size <= 0 || desc.MediaType == "" {
		c.drop(layersBucket, dbKey)
		return ocispec.Descriptor{}, false
	}
	return desc, true
}

// HasLayer reports whether a descriptor of the layer k is remembered,
// counting no lookup: for work done ahead of one (layer.Describer's Ahead).
func (c *Cache) HasLayer(k LayerKey) bool {
	var desc ocispec.Descriptor
	return c != nil && c.get(layersBucket, key("layer", k), &desc)
}

// PutLayer remembers the descriptor of the layer k (without annotations).
func (c *Cache) PutLayer(k LayerKey, desc ocispec.Descriptor) error {
	if c == nil {
		return nil
	}
	desc.Annotations = nil
	return c.put(layersBucket, key("layer", k), desc)
}

// Image returns the remembered image k, if its record is whole.
func (c *Cache) Image(k ImageKey) (Image, bool) {
	var rec Image
	if c == nil {
		return rec, false
	}
	dbKey := key("image", k)
	if !c.get(imagesBucket, dbKey, &rec) {
		lookups.WithLabelValues("image", "miss").Inc()
		return rec, false
	}
	lookups.WithLabelValues("image", "hit").Inc()
	if digest.FromBytes(rec.ManifestBytes) != rec.Manifest.Digest || digest.FromBytes(rec.ConfigBytes) != rec.Config.Digest || len(rec.Layers) == 0 {
		c.drop(imagesBucket, dbKey)
		return Image{}, false
	}
	return rec, true
}

// PutImage remembers the image k.
func (c *Cache) PutImage(k ImageKey, rec Image) error {
	if c == nil {
		return nil
	}
	return c.put(imagesBucket, key("image", k), rec)
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
