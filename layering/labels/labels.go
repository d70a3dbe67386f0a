// Package labels is every name by which this project's images and
// snapshots say what a layer is: the annotations of its layers in a
// manifest (which containerd hands the snapshotter as labels when it
// prepares the layer), the labels of the snapshots the project unpacks,
// and the media type of a reference layer.
package labels

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild/storepath"
)

// Prefix begins every label by which a layer says what it is: store
// paths, symlinks, which layer and its digest. containerd hands
// annotations under containerd.io/snapshot/ to snapshotters as labels.
const Prefix = "containerd.io/snapshot/nixery."

const (
	// Layer names the layer (its content key) a snapshot holds.
	Layer = Prefix + "layer"
	// LayerSize is the size of the layer's tar.
	LayerSize = Prefix + "layer.size"
	// LayerDiffID is its digest (containerd's unpacker labels snapshots
	// with their diffID since 2.x only).
	LayerDiffID = Prefix + "layer.diff-id"
)

// MediaTypeStorePaths is the media type of a reference layer: a JSON list
// of store paths that the nix snapshotter materialises. It is a layer type
// to containerd (its prefix), but no differ can apply it, so another
// snapshotter fails clearly instead of unpacking an empty layer.
const MediaTypeStorePaths = "application/vnd.oci.image.layer.nixery.store-paths.v1+json"

// StorePathsLabel prefixes the layer annotations that list a layer's store
// paths. containerd hands annotations under containerd.io/snapshot/ to the
// snapshotter as labels when it prepares the layer, which is how this
// snapshotter learns what to materialise. containerd bounds a label to
// 4 KiB, so long lists are split over StorePathsLabel.0, .1, ...
const StorePathsLabel = Prefix + "store-paths"

// maxLabelValue keeps key and value of one label under containerd's 4096.
const maxLabelValue = 3900

// StorePathAnnotations describes a layer's store paths as annotations.
func StorePathAnnotations(paths []string) map[string]string {
	return chunkLabels(StorePathsLabel, paths)
}

// chunkLabels spreads paths over prefix.0, prefix.1, ... within
// containerd's bound on a label.
func chunkLabels(prefix string, paths []string) map[string]string {
	out := map[string]string{}
	var chunk strings.Builder
	flush := func() {
		if chunk.Len() > 0 {
			out[prefix+"."+strconv.Itoa(len(out))] = chunk.String()
			chunk.Reset()
		}
	}
	for _, p := range paths {
		if chunk.Len() > 0 && chunk.Len()+1+len(p) > maxLabelValue {
			flush()
		}
		if chunk.Len() > 0 {
			chunk.WriteByte(' ')
		}
		chunk.WriteString(p)
	}
	flush()
	return out
}

func unchunkLabels(prefix string, labels map[string]string) []string {
	var out []string
	for i := 0; ; i++ {
		v, ok := labels[prefix+"."+strconv.Itoa(i)]
		if !ok {
			return out
		}
		out = append(out, strings.Fields(v)...)
	}
}

// SymlinksLabel prefixes the annotations of an image's top layer: the
// packages whose symlink forest it is, in image order. With them the
// snapshotter writes that layer too, so no layer blob is ever fetched.
const SymlinksLabel = Prefix + "symlinks"

// UserLabel names, on an image's symlink layer, the user other than root
// whose accounts and home that layer holds, as "name:uid:gid"
// (tarstream.User). A store path layer is the same for every user.
const UserLabel = Prefix + "user"

// SymlinkAnnotations describes a symlink layer as annotations.
func SymlinkAnnotations(packages []string) map[string]string {
	return chunkLabels(SymlinksLabel, packages)
}

// LayerContent reads what a layer's labels say it holds: store paths, or
// (symlinks) the packages whose symlink forest it is; nil if they say
// neither. Labels come from images, which anyone can write: every entry
// must be a store path (storepath.Check), or the error names those that
// are not.
func LayerContent(labels map[string]string) (paths []string, symlinks bool, err error) {
	paths = unchunkLabels(StorePathsLabel, labels)
	forest := unchunkLabels(SymlinksLabel, labels)
	switch {
	case paths != nil && forest != nil:
		return nil, false, fmt.Errorf("layer labels name both store paths and symlinks: %w", errdefs.ErrInvalidArgument)
	case forest != nil:
		paths, symlinks = forest, true
	case labels[UserLabel] != "":
		return nil, false, fmt.Errorf("layer labels name a user (%s) for a layer of store paths: %w", UserLabel, errdefs.ErrInvalidArgument)
	}
	if err := storepath.CheckAll(paths); err != nil {
		return nil, false, fmt.Errorf("layer labels: %w", err)
	}
	return paths, symlinks, nil
}
