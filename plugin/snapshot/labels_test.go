package snapshot

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestStorePathAnnotations(t *testing.T) {
	for _, n := range []int{0, 1, 10, 500} {
		var paths []string
		for i := 0; i < n; i++ {
			paths = append(paths, fmt.Sprintf("/nix/store/%032d-package-with-a-long-name-%d", i, i))
		}
		labels := StorePathAnnotations(paths)
		for k, v := range labels {
			if !strings.HasPrefix(k, "containerd.io/snapshot/") {
				t.Errorf("%s is not passed to snapshotters", k)
			}
			if len(k)+len(v) > 4096 {
				t.Errorf("label %s is %d bytes, over containerd's limit", k, len(k)+len(v))
			}
		}
		if n == 500 && len(labels) < 2 {
			t.Errorf("500 paths in %d label(s)", len(labels))
		}
		if got := StorePathsFromLabels(labels); !slices.Equal(got, paths) {
			t.Errorf("%d paths: round trip gave %d", n, len(got))
		}
	}
	if got := StorePathsFromLabels(map[string]string{"containerd.io/snapshot.ref": "x"}); got != nil {
		t.Errorf("unrelated labels gave %v", got)
	}
}
