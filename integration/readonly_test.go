package integration

import (
	"context"
	"errors"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// attackScript writes, chmods, chowns, truncates and deletes every file of
// the store paths it is given, then changes their directories and removes
// the last path whole: what a container may do to its own filesystem.
const attackScript = `set -u
shopt -s globstar nullglob dotglob
n=0
for p in "$@"; do
  for f in "$p"/**; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    case $((n % 5)) in
      0) echo written >> "$f" ;;
      1) chmod 4777 "$f" ;;
      2) chown 1234:1234 "$f" ;;
      3) : > "$f" ;;
      4) rm -f "$f" ;;
    esac || echo "could not change $f" >&2
    n=$((n+1))
  done
  chmod 777 "$p" && touch "$p/new" && chown -R 4321:4321 "$p" || echo "could not change $p" >&2
done
rm -rf "${@: -1}"
echo "changed $n files"
`

// Nothing can write through a link into /nix/store: containers (as root,
// and as a root remapped by chown, as user namespaces are made where
// idmapped mounts are not) change every file of store paths of their
// image, on overlayfs, whose layers pull links to the store, and on the
// nix snapshotter; the store stays as it was, contents, modes, owners and
// times, and Nix finds it intact. Views of committed snapshots are
// read-only, and committed snapshots cannot be mounted.
func TestPullLinkedLayersReadOnly(t *testing.T) {
	e := newNixEnv(t)
	// A container in a user namespace reaches its rootfs below containerd's
	// state directory, which must be searchable to all (as /run/containerd
	// is), not private as a temporary directory is made.
	if err := os.Chmod(e.ctd.Dir, 0o711); err != nil {
		t.Fatal(err)
	}
	const base, ref = "nix.local/shell", "nix.local/shell/htop/jq"
	e.mustPull("--snapshotter", "overlayfs", base)
	baseManifest, _ := e.manifest(t, base+":latest")
	inBase := map[string]bool{}
	for _, l := range baseManifest.Layers {
		for _, p := range storePaths(l.Annotations) {
			inBase[p] = true
		}
	}

	for _, snapshotter := range []string{"overlayfs", "nix"} {
		func() {
			e.mustPull("--snapshotter", snapshotter, ref)
			// The store paths the script changes: those the shell it runs
			// in does not need.
			var all, targets []string
			m, _ := e.manifest(t, ref+":latest")
			for _, l := range m.Layers {
				for _, p := range storePaths(l.Annotations) {
					all = append(all, p)
					if !inBase[p] {
						targets = append(targets, p)
					}
				}
			}
			if len(targets) < 2 {
				t.Fatalf("%s: only %v of %s are not in %s", snapshotter, targets, ref, base)
			}
			before := storeTrees(t, all)
			if snapshotter == "overlayfs" {
				// The test means something only if the layers are links.
				if n := linkedFiles(t, filepath.Join(e.ctd.Dir, "root", "io.containerd.snapshotter.v1.overlayfs", "snapshots"), targets); n == 0 {
					t.Fatal("no store file of the image is linked into an overlayfs snapshot")
				}
			}
			attacks := [][]string{nil}
			if canUserNS() {
				attacks = append(attacks, []string{"--uidmap=0:100000:65536", "--gidmap=0:100000:65536"})
			} else {
				// A chroot (hack/debian13.sh) may not make user namespaces:
				// the host's pass of the suite runs this one.
				t.Logf("%s: this environment makes no user namespaces: the remapped container is left to the host's run", snapshotter)
			}
			for _, userns := range attacks {
				args := append(append([]string{"--snapshotter=" + snapshotter}, userns...), ref, "bash", "-c", attackScript, "attack")
				if out := e.run(args[0], append(args[1:], targets...)...); !strings.HasPrefix(out, "changed ") || out == "changed 0 files\n" {
					t.Errorf("%s: container %v printed %q", snapshotter, userns, out)
				}
				if after := storeTrees(t, all); !maps.Equal(before, after) {
					for p, d := range after {
						if before[p] != d {
							t.Errorf("%s: after a container %v changed its files, the store's %s is %s, was %s", snapshotter, userns, p, d, before[p])
							break
						}
					}
				}
			}
			verify := exec.Command("nix-store", append([]string{"--verify-path"}, all...)...)
			if out, err := verify.CombinedOutput(); err != nil {
				t.Errorf("%s: nix-store --verify-path: %v\n%s", snapshotter, err, out)
			}
			if out := e.runOn(snapshotter, ref, "htop", "--version"); !strings.Contains(out, htopVersion()) {
				t.Errorf("%s: after the changes, a new container's htop --version printed %q", snapshotter, out)
			}
			committedReadOnly(t, e, snapshotter, m)
		}()
	}
}

// canUserNS says whether this process may make user namespaces (a
// chrooted one may not).
func canUserNS() bool { return exec.Command("unshare", "--user", "true").Run() == nil }

// storeTrees describes every entry below paths (testutil.DescribeTree).
func storeTrees(t *testing.T, paths []string) map[string]string {
	t.Helper()
	all := map[string]string{}
	for _, p := range paths {
		for rel, d := range testutil.DescribeTree(t, p) {
			all[filepath.Join(p, rel)] = d
		}
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		all[p] = fi.Mode().String()
	}
	return all
}

// linkedFiles counts the regular files of paths whose inodes are also
// below dir.
func linkedFiles(t *testing.T, dir string, paths []string) int {
	t.Helper()
	inodes := map[uint64]bool{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			var st syscall.Stat_t
			if syscall.Lstat(p, &st) == nil {
				inodes[st.Ino] = true
			}
		}
		return nil
	})
	n := 0
	for _, p := range paths {
		filepath.WalkDir(p, func(f string, d os.DirEntry, err error) error {
			var st syscall.Stat_t
			if err == nil && d.Type().IsRegular() && syscall.Lstat(f, &st) == nil && inodes[st.Ino] {
				n++
			}
			return nil
		})
	}
	return n
}

// committedReadOnly checks that the image's committed snapshots can be
// seen only read-only: their views refuse writes, and they cannot be
// mounted themselves.
func committedReadOnly(t *testing.T, e *env, snapshotter string, m ocispec.Manifest) {
	t.Helper()
	var cfg ocispec.Image
	e.readJSON(t, m.Config, &cfg)
	chains := identity.ChainIDs(slices.Clone(cfg.RootFS.DiffIDs))
	sn := e.ctd.Client.SnapshotService(snapshotter)
	// Under a lease: containerd's collector takes a view that nothing holds.
	ctx, done, err := e.ctd.Client.WithLease(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	defer done(context.WithoutCancel(ctx))
	for _, chain := range []string{chains[0].String(), chains[len(chains)-1].String()} {
		if _, err := sn.Mounts(ctx, chain); err == nil {
			t.Errorf("%s: the committed snapshot %s can be mounted", snapshotter, chain)
		}
		key := "readonly-view-" + chain
		mounts, err := sn.View(ctx, key, chain)
		if err != nil {
			t.Fatal(err)
		}
		err = mount.WithTempMount(context.Background(), mounts, func(root string) error {
			var probe []string
			filepath.WalkDir(filepath.Join(root, "nix", "store"), func(p string, d os.DirEntry, err error) error {
				if err == nil && d.Type().IsRegular() && len(probe) == 0 {
					probe = append(probe, p)
				}
				return nil
			})
			if len(probe) == 0 {
				t.Errorf("%s: view of %s holds no store file", snapshotter, chain)
				return nil
			}
			f, err := os.OpenFile(probe[0], os.O_WRONLY|os.O_APPEND, 0)
			if err == nil {
				f.Close()
				t.Errorf("%s: a view of %s opens %s for writing", snapshotter, chain, probe[0])
			} else if !errors.Is(err, syscall.EROFS) {
				t.Errorf("%s: writing %s in a view: %v, want a read-only filesystem", snapshotter, probe[0], err)
			}
			if err := os.Chmod(probe[0], 0o777); !errors.Is(err, syscall.EROFS) {
				t.Errorf("%s: chmod in a view of %s: %v, want a read-only filesystem", snapshotter, chain, err)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
}
