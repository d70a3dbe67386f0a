package nixbuild

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// What fixes a package set, found without Nix: a path or search path entry
// that really is in the store; a clean git work tree's commit. Nothing
// fixes a plain directory, a changed work tree, a URL, or an entry the
// search path evaluation sees does not have.
func TestSourcePin(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	store := filepath.Join(root, "store")
	channel := filepath.Join(store, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixpkgs", "nixpkgs")
	if err := os.MkdirAll(channel, 0o755); err != nil {
		t.Fatal(err)
	}
	// As nix-channel makes it: a profile of symlinks into the store.
	profile := filepath.Join(root, "channels")
	if err := os.Symlink(filepath.Dir(channel), profile); err != nil {
		t.Fatal(err)
	}
	inStore := "store:" + channel
	plain := t.TempDir()

	pathOf := func(dir string) Source {
		s, err := PathSource(dir)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	for _, c := range []struct {
		name    string
		source  Source
		nixPath string
		want    string
	}{
		{"path into the store", pathOf(filepath.Join(profile, "nixpkgs")), "", inStore},
		{"store path", pathOf(channel), "", inStore},
		{"plain directory", pathOf(plain), "", ""},
		{"search path entry into the store", ChannelSource("<nixpkgs>"), "foo=/x:nixpkgs=" + filepath.Join(profile, "nixpkgs"), inStore},
		{"search path without the entry", ChannelSource("<nixpkgs>"), "other=" + channel, ""},
		{"search path entry of a URL", ChannelSource("<nixpkgs>"), "nixpkgs=https://example.org/nixpkgs.tar.gz", ""},
		{"search path entry of a plain directory", ChannelSource("<nixpkgs>"), "nixpkgs=" + plain, ""},
		{"channel by name", ChannelSource("nixos-24.05"), "", ""},
	} {
		if got := c.source.pin(ctx, LatestTag, c.nixPath, store); got != c.want {
			t.Errorf("%s: pinned by %q, want %q", c.name, got, c.want)
		}
	}

	if _, err := exec.LookPath("git"); err != nil {
		t.Fatal("git is needed (hack/setup.sh installs it)")
	}
	tree := t.TempDir()
	git := func(args ...string) string { return testutil.Git(t, tree, args...) }
	git("init", "-q")
	src := pathOf(tree)
	if got := src.pin(ctx, LatestTag, "", store); got != "" {
		t.Errorf("work tree without a commit: pinned by %q", got)
	}
	os.WriteFile(filepath.Join(tree, "default.nix"), []byte("{}"), 0o644)
	git("add", "default.nix")
	git("commit", "-q", "-m", "one")
	first := git("rev-parse", "HEAD")
	if got := src.pin(ctx, LatestTag, "", store); got != "git:"+first {
		t.Errorf("clean work tree: pinned by %q, want git:%s", got, first)
	}
	// A directory in the tree is not pinned by its commit.
	os.Mkdir(filepath.Join(tree, "pkgs"), 0o755)
	os.WriteFile(filepath.Join(tree, "pkgs", "a.nix"), []byte("{}"), 0o644)
	if got := pathOf(filepath.Join(tree, "pkgs")).pin(ctx, LatestTag, "", store); got != "" {
		t.Errorf("directory in a work tree: pinned by %q", got)
	}
	if got := src.pin(ctx, LatestTag, "", store); got != "" {
		t.Errorf("work tree with an untracked file: pinned by %q", got)
	}
	git("add", "pkgs")
	if got := src.pin(ctx, LatestTag, "", store); got != "" {
		t.Errorf("work tree with a staged change: pinned by %q", got)
	}
	git("commit", "-q", "-m", "two")
	os.WriteFile(filepath.Join(tree, "default.nix"), []byte("{ x = 1; }"), 0o644)
	if got := src.pin(ctx, LatestTag, "", store); got != "" {
		t.Errorf("work tree with a changed file: pinned by %q", got)
	}
	git("commit", "-q", "-am", "three")
	head := git("rev-parse", "HEAD")
	if got := src.pin(ctx, LatestTag, "", store); got != "git:"+head || head == first {
		t.Errorf("clean again: pinned by %q, want git:%s", got, head)
	}
	// An ignored file may be read as well as any other.
	os.WriteFile(filepath.Join(tree, ".gitignore"), []byte("local.nix\n"), 0o644)
	git("add", ".gitignore")
	git("commit", "-q", "-m", "four")
	os.WriteFile(filepath.Join(tree, "local.nix"), []byte("{}"), 0o644)
	if got := src.pin(ctx, LatestTag, "", store); got != "" {
		t.Errorf("work tree with an ignored file: pinned by %q", got)
	}
	os.Remove(filepath.Join(tree, "local.nix"))
	// A user's checkout: git runs as its owner, so git itself trusts it.
	if os.Getuid() == 0 {
		head = git("rev-parse", "HEAD")
		// Reachable by its owner, as a checkout is.
		for d := tree; d != filepath.Dir(d) && strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
			os.Chmod(d, 0o755)
		}
		if out, err := exec.Command("chown", "-R", "1234:1234", tree).CombinedOutput(); err != nil {
			t.Fatalf("chown: %v\n%s", err, out)
		}
		if got := src.pin(ctx, LatestTag, "", store); got != "git:"+head {
			t.Errorf("a user's clean work tree: pinned by %q, want git:%s", got, head)
		}
	}
}

// A flake reference takes a tag as its rev (a commit id) or ref, except a
// path: flake; a commit or a content hash pins it.
func TestFlakeSource(t *testing.T) {
	for _, bad := range []string{"", "/srv/flake", "path:/srv/my flake", "git+file:///srv/flake\n", "path:./flake", "path:flake", "git+file:flake"} {
		if _, err := FlakeSource(bad); !errdefs.IsInvalidArgument(err) {
			t.Errorf("FlakeSource(%q): %v", bad, err)
		}
	}
	const commit = "0123456789abcdef0123456789abcdef01234567"
	git, _ := FlakeSource("git+file:///srv/flake?ref=main&dir=sub")
	path, _ := FlakeSource("path:/srv/flake")
	locked, _ := FlakeSource("path:/srv/flake?narHash=sha256-AAAA")
	for _, c := range []struct {
		src    Source
		tag    string
		ref    string
		pinned bool
	}{
		{git, "latest", "git+file:///srv/flake?ref=main&dir=sub", false},
		{git, "feature", "git+file:///srv/flake?dir=sub&ref=feature", false},
		{git, commit, "git+file:///srv/flake?dir=sub&rev=" + commit, true},
		{path, commit, "path:/srv/flake", false},
		{locked, "latest", "path:/srv/flake?narHash=sha256-AAAA", true},
	} {
		arg, err := c.src.locate(c.tag)
		if err != nil || arg["flake"] != c.ref || arg["type"] != "flake" {
			t.Errorf("%s at %s: %v, %v; want %s", c.src, c.tag, arg, err, c.ref)
		}
		if c.src.fetchedFrom(c.tag) {
			t.Errorf("%s is fetched before evaluation", c.src)
		}
		if got := c.src.Pinned(c.tag); got != c.pinned {
			t.Errorf("%s at %s pinned: %v, want %v", c.src, c.tag, got, c.pinned)
		}
	}
}
