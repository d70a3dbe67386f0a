package testutil

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
)

// Store paths of FakeStore.
const (
	FakeGlibc = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-glibc-2.36"
	FakeHtop  = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-htop-3.2.2"
)

// FakeStore makes a root directory holding a Nix store of two paths,
// FakeGlibc and FakeHtop, with Nix's modes and times: files, an executable,
// a symlink.
func FakeStore(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	for name, content := range map[string]string{
		FakeGlibc + "/lib/libc.so.6":   "libc",
		FakeHtop + "/bin/htop":         "htop",
		FakeHtop + "/share/doc/README": "readme",
	} {
		p := filepath.Join(root, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte(content), 0o444)
	}
	os.Chmod(filepath.Join(root, FakeHtop, "bin/htop"), 0o555)
	os.Symlink("libc.so.6", filepath.Join(root, FakeGlibc, "lib/libc.so"))
	// Nix's canonical times.
	filepath.WalkDir(filepath.Join(root, "nix", "store"), func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			unix.Lutimes(p, []unix.Timeval{{Sec: 1}, {Sec: 1}})
		}
		return nil
	})
	return root
}

// DescribeTree says, for each entry below dir by relative path, its type,
// permissions, owners, mtime, and symlink target or contents: what two
// trees must agree on to be the same layer.
func DescribeTree(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		desc := fmt.Sprintf("%v uid=%d gid=%d mtime=%d", info.Mode(), st.Uid, st.Gid, info.ModTime().Unix())
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			desc += " -> " + target
		case info.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			desc += fmt.Sprintf(" %q", b)
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Nlink is how many names the file at p has.
func Nlink(t testing.TB, p string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Nlink)
}

// Git runs git in dir, as a user of its own, and returns its output.
func Git(t testing.TB, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", append([]string{"-C", dir, "-c", "user.email=t@example.org", "-c", "user.name=t"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// Cache opens a cache in a directory of the test's.
func Cache(t testing.TB) *cache.Cache {
	t.Helper()
	c, err := cache.Open(t.TempDir(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// FlakeRepo commits, in the git repository repo (made on first use), a
// flake without inputs whose legacyPackages.x86_64-linux is the test
// package set and whose packages.x86_64-linux are extra (Nix attribute set
// entries, with the package set as pkgs); it returns the commit.
func FlakeRepo(t testing.TB, repo, extra string) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(repo, ".git")); err != nil {
		Git(t, repo, "init", "-q", "-b", "main")
		if out, err := exec.Command("cp", "-r", TestPkgs(), filepath.Join(repo, "pkgs")).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v\n%s", err, out)
		}
	}
	flake := `{
  outputs = { self }:
    let pkgs = import ./pkgs { system = "x86_64-linux"; };
    in {
      legacyPackages.x86_64-linux = pkgs;
      packages.x86_64-linux = {` + extra + `};
    };
}
`
	if err := os.WriteFile(filepath.Join(repo, "flake.nix"), []byte(flake), 0o644); err != nil {
		t.Fatal(err)
	}
	Git(t, repo, "add", ".")
	Git(t, repo, "commit", "-q", "-m", "flake")
	return Git(t, repo, "rev-parse", "HEAD")
}
