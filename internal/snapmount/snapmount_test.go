package snapmount

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

func TestWritable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mounts  []mount.Mount
		dir     string
		lowers  []string
		overlay bool
	}{
		{"writable bind", []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"rbind", "rw"}}}, "/s/1/fs", nil, false},
		{"read-only bind", []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"rbind", "ro"}}}, "", nil, false},
		{"overlay", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs:/s/0/fs"}}}, "/s/2/fs", []string{"/s/1/fs", "/s/0/fs"}, true},
		{"overlay view", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/s/1/fs:/s/0/fs"}}}, "", []string{"/s/1/fs", "/s/0/fs"}, false},
		{"two mounts", []mount.Mount{{Type: "bind", Source: "/a"}, {Type: "bind", Source: "/b"}}, "", nil, false},
		{"other", []mount.Mount{{Type: "erofs", Source: "/layer.erofs"}}, "", nil, false},
	} {
		dir, lowers, overlay := Writable(tc.mounts)
		if dir != tc.dir || !slices.Equal(lowers, tc.lowers) || overlay != tc.overlay {
			t.Errorf("%s: %q %q %v, want %q %q %v", tc.name, dir, lowers, overlay, tc.dir, tc.lowers, tc.overlay)
		}
	}
}

type remover struct {
	removed []string
	ctxErr  error
}

func (r *remover) Remove(ctx context.Context, key string) error {
	r.removed, r.ctxErr = append(r.removed, key), ctx.Err()
	return nil
}

// A failed snapshot's files go first, its directory stays for the
// snapshotter to remove, and the removal happens even when the request
// that failed was cancelled.
func TestDiscard(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "nix", "store", "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), []byte("x"), 0o444); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var sn remover
	Discard(ctx, &sn, "extract-1", []mount.Mount{{Type: "bind", Source: dir, Options: []string{"rw"}}})
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Errorf("left %v in the snapshot's directory (%v)", entries, err)
	}
	if !slices.Equal(sn.removed, []string{"extract-1"}) || sn.ctxErr != nil {
		t.Errorf("removed %v with a context ending in %v", sn.removed, sn.ctxErr)
	}
}
