package snapmount

import (
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
