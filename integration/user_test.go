package integration

import (
	"strings"
	"testing"

	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
)

// An image of [image] user runs as that user, with its accounts and a home
// it owns, however it is provisioned: unpacked straight into overlayfs
// snapshots, made by the nix snapshotter, unpacked by containerd from tar
// layers in the content store. Its symlink layer is the same layer each
// way.
func TestPullUser(t *testing.T) {
	e := newNixEnv(t, func(e *env) { e.extraImage = map[string]any{"user": "alice:1001:1002"} })
	const ref = "nix.local/shell"
	const script = `id -u; id -g; id -un; echo "$HOME"; stat -c %u:%g "$HOME"; ` +
		`touch "$HOME/f" && echo home-writable; touch /etc/x 2>/dev/null || echo etc-not-writable; ` +
		`wc -l < /etc/passwd`
	const want = "1001\n1002\nalice\n/home/alice\n1001:1002\nhome-writable\netc-not-writable\n3\n"
	var forest []string
	for _, way := range []struct {
		name        string
		pull        []string
		snapshotter string
	}{
		{"overlayfs", []string{"--snapshotter", "overlayfs"}, "overlayfs"},
		{"nix", []string{"--snapshotter", "nix"}, "nix"},
		{"tar layers", []string{"--snapshotter", "overlayfs", "--with-layers"}, "overlayfs"},
	} {
		e.mustPull(append(way.pull, ref)...)
		cfg := e.config_(t, ref+":latest")
		if cfg.Config.User != "1001:1002" {
			t.Errorf("%s: config's User is %q", way.name, cfg.Config.User)
		}
		if got := e.runOn(way.snapshotter, ref, "bash", "-c", script); got != want {
			t.Errorf("%s: the container printed\n%s\nwant\n%s", way.name, got, want)
		}
		m, _ := e.manifest(t, ref+":latest")
		top := m.Layers[len(m.Layers)-1]
		if u := top.Annotations[labels.UserLabel]; u != "alice:1001:1002" {
			t.Errorf("%s: the symlink layer's %s is %q", way.name, labels.UserLabel, u)
		}
		forest = append(forest, top.Digest.String())
		e.removeImages(t, ref)
	}
	if forest[0] != forest[1] || forest[1] != forest[2] {
		t.Errorf("the symlink layer differs between the ways: %s", strings.Join(forest, ", "))
	}
}
