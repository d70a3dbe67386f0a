package snapshot

import (
	"strconv"
	"strings"
)

// StorePathsLabel prefixes the layer annotations that list a layer's store
// paths. containerd hands annotations under containerd.io/snapshot/ to the
// snapshotter as labels when it prepares the layer, which is how this
// snapshotter learns what to materialise. containerd bounds a label to
// 4 KiB, so long lists are split over StorePathsLabel.0, .1, ...
const StorePathsLabel = "containerd.io/snapshot/nixery.store-paths"

// maxLabelValue keeps key and value of one label under containerd's 4096.
const maxLabelValue = 3900

// StorePathAnnotations describes a layer's store paths as annotations.
func StorePathAnnotations(paths []string) map[string]string {
	out := map[string]string{}
	var chunk strings.Builder
	flush := func() {
		if chunk.Len() > 0 {
			out[StorePathsLabel+"."+strconv.Itoa(len(out))] = chunk.String()
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

// StorePathsFromLabels reads what StorePathAnnotations wrote; nil if the
// labels name no store paths.
func StorePathsFromLabels(labels map[string]string) []string {
	var out []string
	for i := 0; ; i++ {
		v, ok := labels[StorePathsLabel+"."+strconv.Itoa(i)]
		if !ok {
			return out
		}
		out = append(out, strings.Fields(v)...)
	}
}
