package integration

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// The `nix` snapshotter's layers share the store's inodes on the store
// layouts nodes have: NixOS's read-only bind mount of /nix/store (Nix
// writing through its daemon, which has a writable view), /nix on a
// filesystem of its own holding the snapshotter root too. Where the root
// is on another filesystem, files are copied and the daemon says so at
// start and in its metrics. Each layout is made in a private mount
// namespace; the test measures bytes written into the snapshotter root.
func TestNixSnapshotterStoreLayouts(t *testing.T) {
	t.Run("read-only bind-mounted store", func(t *testing.T) {
		if !testutil.InMountNamespace(t) {
			return
		}
		readOnlyStore(t)
		e := newNixEnv(t)
		assertZeroCopy(t, e, true)
		if !strings.Contains(e.daemon.log(), "linked into layers through a private clone of mount /") {
			t.Errorf("daemon log does not say how it links:\n%s", e.daemon.log())
		}
	})
	t.Run("nix on its own filesystem", func(t *testing.T) {
		if !testutil.InMountNamespace(t) {
			return
		}
		ownFilesystem(t, "/nix")
		// The snapshotter root (and every temporary directory) on /nix.
		tmp := "/nix/var/tmp"
		if err := os.MkdirAll(tmp, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Setenv("TMPDIR", tmp)
		readOnlyStore(t)
		e := newNixEnv(t)
		assertZeroCopy(t, e, true)
		if !strings.Contains(e.daemon.log(), "linked into layers through a private clone of mount /nix") {
			t.Errorf("daemon log does not say how it links:\n%s", e.daemon.log())
		}
	})
	t.Run("snapshotter root on another filesystem", func(t *testing.T) {
		if !testutil.InMountNamespace(t) {
			return
		}
		// Short: containerd's socket goes below it.
		tmp, err := os.MkdirTemp("", "fs-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(tmp) })
		ownFilesystem(t, tmp)
		t.Setenv("TMPDIR", tmp)
		e := newNixEnv(t)
		if !strings.Contains(e.daemon.log(), "store files cannot be hard-linked into this snapshotter root") {
			t.Errorf("no warning at start; daemon log:\n%s", e.daemon.log())
		}
		if got := e.metric(t, `nixery_snapshot_store_linkable{snapshotter="nix"}`); got != 0 {
			t.Errorf("nixery_snapshot_store_linkable %v, want 0", got)
		}
		assertZeroCopy(t, e, false)
	})
}

// ownFilesystem mounts an empty tmpfs on dir.
func ownFilesystem(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatalf("tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// readOnlyStore makes /nix/store a read-only bind mount of itself, as
// NixOS does, after starting a nix-daemon that keeps a writable view (in a
// mount namespace of its own), and points Nix at that daemon.
func readOnlyStore(t *testing.T) {
	t.Helper()
	testutil.RequireCommands(t, "nix-daemon")
	if err := os.MkdirAll("/nix/store", 0o755); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(t.TempDir(), "daemon-socket")
	daemon := exec.Command("unshare", "--mount", "--propagation", "private", "nix-daemon")
	var conf []string
	for k, v := range testutil.NixOptions() {
		conf = append(conf, k+" = "+v)
	}
	daemon.Env = append(os.Environ(), "NIX_DAEMON_SOCKET_PATH="+socket, "NIX_CONFIG="+strings.Join(conf, "\n"))
	log, err := os.Create(filepath.Join(t.TempDir(), "nix-daemon.log"))
	if err != nil {
		t.Fatal(err)
	}
	daemon.Stdout, daemon.Stderr = log, log
	daemon.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { daemon.Process.Kill(); daemon.Wait() })
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nix-daemon made no socket")
		}
	}
	// Only now, so that the daemon's namespace keeps the writable store.
	for _, m := range []struct {
		flags uintptr
	}{{unix.MS_BIND}, {unix.MS_REMOUNT | unix.MS_BIND | unix.MS_RDONLY}} {
		if err := unix.Mount("/nix/store", "/nix/store", "", m.flags, ""); err != nil {
			t.Fatalf("read-only store: %v", err)
		}
	}
	t.Cleanup(func() { unix.Unmount("/nix/store", unix.MNT_DETACH) })
	if err := os.WriteFile("/nix/store/.probe", nil, 0o644); err == nil {
		t.Fatal("the store is writable")
	}
	t.Setenv("NIX_REMOTE", "daemon")
	t.Setenv("NIX_DAEMON_SOCKET_PATH", socket)
}

// assertZeroCopy pulls shell/htop into the nix snapshotter, runs it, and
// checks that the layer's htop is the store's inode (linked) or not
// (copied, and counted), logging the bytes the pull wrote into the
// snapshotter root against the closure's size.
func assertZeroCopy(t *testing.T, e *env, linked bool) {
	t.Helper()
	htop := e.mustNixBuild("htop")
	start := time.Now()
	e.mustPull("--snapshotter", "nix", "nix.local/shell/htop")
	took := time.Since(start)
	if out := e.runOn("nix", "nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}

	file := filepath.Join(htop, "bin", "htop")
	layerFiles(t, e.daemon.root, file, linked)
	copied := e.metric(t, `nixery_snapshot_files_copied_total{snapshotter="nix"}`)
	if linked != (copied == 0) {
		t.Errorf("nixery_snapshot_files_copied_total %v", copied)
	}
	if got := e.metric(t, `nixery_snapshot_store_linkable{snapshotter="nix"}`); linked != (got == 1) {
		t.Errorf("nixery_snapshot_store_linkable %v", got)
	}
	m, _ := e.manifest(t, "nix.local/shell/htop:latest")
	var paths []string
	for _, l := range m.Layers {
		paths = append(paths, storePaths(l.Annotations)...)
	}
	closure := closureBytes(t, paths)
	written := diskBytes(e.daemon.root)
	t.Logf("image's store paths %d KiB; written into the snapshotter root %d KiB (files not linked to the store); pull %v; %v files copied",
		closure>>10, written>>10, took.Round(time.Millisecond), copied)
	if linked && written >= closure/2 {
		t.Errorf("linked, but %d bytes written for a %d-byte closure", written, closure)
	}
	if !linked && written < closure/2 {
		t.Errorf("copied, but only %d bytes written for a %d-byte closure", written, closure)
	}

	// Pulled into overlayfs, the image's layers are linked to the store
	// as well: containerd's root is where the snapshotter root is.
	e.mustPull("--snapshotter", "overlayfs", "nix.local/shell/htop")
	if out := e.runOn("overlayfs", "nix.local/shell/htop", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("overlayfs: htop --version printed %q", out)
	}
	layerFiles(t, filepath.Join(e.ctd.Dir, "root", "io.containerd.snapshotter.v1.overlayfs"), file, linked)
	if got := e.metric(t, `nixery_snapshot_store_linkable{snapshotter="overlayfs"}`); linked != (got == 1) {
		t.Errorf("overlayfs: nixery_snapshot_store_linkable %v", got)
	}
}

// layerFiles checks that the layers below dir hold file, a store file, as
// the store's own inode (linked) or not.
func layerFiles(t *testing.T, dir, file string, linked bool) {
	t.Helper()
	var store, layer syscall.Stat_t
	if err := syscall.Stat(file, &store); err != nil {
		t.Fatal(err)
	}
	found := 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, file) && syscall.Stat(p, &layer) == nil {
			found++
			if same := layer.Dev == store.Dev && layer.Ino == store.Ino; same != linked {
				t.Errorf("%s: shares the store's inode %v, want %v", p, same, linked)
			}
		}
		return nil
	})
	if found == 0 {
		t.Errorf("no layer in %s holds %s", dir, file)
	}
}

// closureBytes is the size of the regular files of store paths.
func closureBytes(t *testing.T, paths []string) int64 {
	t.Helper()
	if len(paths) == 0 {
		t.Fatal("no store paths")
	}
	var n int64
	for _, p := range paths {
		filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if info, err := d.Info(); err == nil {
					n += info.Size()
				}
			}
			return nil
		})
	}
	return n
}
