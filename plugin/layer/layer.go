// Package layer is the layers of images: what a layer holds (store paths,
// or the symlink forest of an image's packages), and the Describers that
// give layers their descriptors while they store them where they must go
// (nowhere, the content store, snapshots) — on a node where Nix has the
// store paths, without copying them.
package layer

import (
	"context"
	"io"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// Layer is one layer of a built image: store paths, or the symlink forest
// of the image's packages.
type Layer struct {
	Desc ocispec.Descriptor
	// Paths are the layer's store paths, or for the symlink layer the
	// packages' output paths in image order.
	Paths []string
	// Hashes are the paths' NAR hashes: with the paths, what the layer's
	// bytes depend on (a path rebuilt differently has another hash).
	Hashes   []string
	Symlinks bool
	// User is whom the image runs as, whose accounts a symlink layer
	// holds (root, the zero User, has none).
	User tarstream.User
	// Blob is the layer's content when it is small and kept in memory (a
	// reference layer).
	Blob []byte
}

// Key identifies the layer's content independent of its encoding.
func (l *Layer) Key() string {
	kind := "layer"
	if l.Symlinks {
		kind = "symlinks"
	}
	content := strings.Join(l.Paths, "\n")
	if u := l.User.Key(); u != "" {
		content += "\nuser " + u
	}
	return "nixery-" + kind + "-" + digest.FromString(content).Encoded()
}

// CacheKey keys the layer's descriptor in the cache.
func (l *Layer) CacheKey() cache.LayerKey {
	return cache.LayerKey{Symlinks: l.Symlinks, Paths: l.Paths, Hashes: l.Hashes, User: l.User.Key()}
}

// WriteTar writes the layer's tar.
func (l *Layer) WriteTar(w io.Writer) error { return l.WriteTarFrom(w, 0) }

// WriteTarFrom writes the layer's tar from byte offset on, without reading
// the files before it.
func (l *Layer) WriteTarFrom(w io.Writer, offset int64) error {
	if l.Symlinks {
		return tarstream.WriteSymlinkForest(w, l.Paths, tarstream.Skip(offset), tarstream.WithUser(l.User))
	}
	return tarstream.WriteStorePaths(w, l.Paths, tarstream.Skip(offset))
}

// Describer gives a layer its descriptor (l.Desc, and l.Blob for layers
// kept in memory), storing the content wherever it has to go on the way.
// An image's layers are described in order, base first; parent is the
// chain ID of those below l.
type Describer interface {
	Describe(ctx context.Context, parent digest.Digest, l *Layer) error
	// Key says how layers are described and where they are stored.
	Key() DescriberKey
	// Finish is called once the image's layers are described, before the
	// image is registered: what the caller must keep of what was
	// described, it holds from then on. It is called too when describing
	// failed: what the Describer started is over when it returns. A
	// finished Describer may describe the image again from its first
	// layer (a build that is retried).
	Finish(ctx context.Context) error
	// Ahead is given every layer of the image before the first is
	// described, to begin what needs no chain below it: a describer that
	// reads layers to hash them hashes them beside each other, and each
	// Describe finds its digest made or under way. stop ends what it
	// began and waits for it.
	Ahead(ctx context.Context, layers []*Layer) (stop func())
}

// DescriberKey says what a Describer does, as the keys of shared and
// cached work need it.
type DescriberKey struct {
	// Kind names how layers are described and stored, with a version.
	Kind string
	// Layers names what the descriptors are, with a version: equal for
	// describers whose descriptors are equal (tar layers, however they
	// are stored), so that they share cached images. Part of the
	// persisted image cache key: it must change when descriptors do.
	Layers string
	// Scope is "" for a Describer that stores nothing of its caller's;
	// else unique to its caller (what it stores is held by the caller's
	// lease), so that no other caller shares its work.
	Scope string
}

// ChainID is the snapshot name of layer diffID on top of the chain parent.
func ChainID(parent, diffID digest.Digest) digest.Digest {
	if parent == "" {
		return diffID
	}
	return identity.ChainID([]digest.Digest{parent, diffID})
}

// callerScopes numbers the Describers whose work is their caller's own.
var callerScopes atomic.Int64

// callerScope is a new DescriberKey.Scope.
func callerScope() string { return "caller-" + strconv.FormatInt(callerScopes.Add(1), 10) }
