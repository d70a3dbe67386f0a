package labels

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
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
		if got, symlinks, err := LayerContent(labels); err != nil || symlinks || !slices.Equal(got, paths) {
			t.Errorf("%d paths: round trip gave %d, %v, %v", n, len(got), symlinks, err)
		}
		if got, symlinks, err := LayerContent(SymlinkAnnotations(paths)); err != nil || symlinks != (n > 0) || !slices.Equal(got, paths) {
			t.Errorf("%d symlinks: round trip gave %d, %v, %v", n, len(got), symlinks, err)
		}
	}
	if got, _, err := LayerContent(map[string]string{"containerd.io/snapshot.ref": "x"}); got != nil || err != nil {
		t.Errorf("unrelated labels gave %v, %v", got, err)
	}
}

// htop is a store path.
const htop = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-htop-3.2.2"

// Labels are written by whoever made the image: anything that is not a
// store path is refused, naming it.
func TestLayerContentHostile(t *testing.T) {
	for _, bad := range testutil.HostileStorePaths(htop) {
		for _, labels := range []map[string]string{
			{StorePathsLabel + ".0": htop + " " + bad},
			{SymlinksLabel + ".0": bad},
		} {
			if _, _, err := LayerContent(labels); !errdefs.IsInvalidArgument(err) {
				t.Errorf("%q: %v", bad, err)
			}
		}
	}
	both := map[string]string{StorePathsLabel + ".0": htop, SymlinksLabel + ".0": htop}
	if _, _, err := LayerContent(both); !errdefs.IsInvalidArgument(err) {
		t.Errorf("store paths and symlinks: %v", err)
	}
}

// A user label is for a symlink layer only: a layer of store paths is the
// same for every user.
func TestLayerContentUser(t *testing.T) {
	forest := SymlinkAnnotations([]string{htop})
	forest[UserLabel] = "alice:1001:100"
	if _, _, err := LayerContent(forest); err != nil {
		t.Errorf("a symlink layer with a user: %v", err)
	}
	paths := StorePathAnnotations([]string{htop})
	paths[UserLabel] = "alice:1001:100"
	if _, _, err := LayerContent(paths); !errdefs.IsInvalidArgument(err) {
		t.Errorf("a store path layer with a user: %v", err)
	}
}
