// Package storelink hard-links files of the Nix store into directories on
// the store's filesystem, also where the store is a mount of its own.
//
// link(2) works only within one mount, not merely one filesystem. NixOS
// makes /nix/store a read-only bind mount of itself, and many hosts give
// /nix a filesystem and mount of its own, so a link from the store into,
// say, /var/lib/nixery-snapshotter fails with EXDEV although both are on
// one disk. A Linker then links through a private, detached clone of a
// mount of that filesystem from which both directories can be reached:
// invisible to every other process, gone when the Linker is closed or the
// process dies, never attached anywhere.
package storelink

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// ErrOtherFilesystem is why a Linker cannot be made: the directory is not
// on the store's filesystem, so no link can join them.
var ErrOtherFilesystem = errors.New("not on the store's filesystem")

// Linker links files below a store directory to paths below a target
// directory.
type Linker struct {
	store, target []string // each as given and with symlinks resolved
	// mount is the private clone both are reached through, or nil when
	// they are on one mount already.
	mount               *os.File
	storeRel, targetRel string // store and target within mount
	how                 string
	mu                  sync.RWMutex // Close waits for links being made
	closed              bool
}

// New finds how files below store can be hard-linked below target. Where
// target is on another filesystem it fails with ErrOtherFilesystem.
func New(store, target string) (*Linker, error) {
	l := &Linker{how: "one mount"}
	for _, d := range []struct {
		dir  string
		into *[]string
	}{{store, &l.store}, {target, &l.target}} {
		real, err := filepath.EvalSymlinks(d.dir)
		if err != nil {
			return nil, err
		}
		*d.into = []string{filepath.Clean(d.dir), real}
	}
	// Links need one filesystem: st_dev tells (also btrfs subvolumes apart,
	// which share a device number in the mount table).
	var storeDev, targetDev unix.Stat_t
	if err := unix.Stat(l.store[1], &storeDev); err != nil {
		return nil, err
	}
	if err := unix.Stat(l.target[1], &targetDev); err != nil {
		return nil, err
	}
	if storeDev.Dev != targetDev.Dev {
		return nil, fmt.Errorf("%s is on device %d:%d, the store %s on %d:%d (another filesystem or btrfs subvolume): %w",
			target, unix.Major(targetDev.Dev), unix.Minor(targetDev.Dev), store, unix.Major(storeDev.Dev), unix.Minor(storeDev.Dev), ErrOtherFilesystem)
	}
	storeMount, err := mountOf(l.store[1])
	if err != nil {
		return nil, err
	}
	targetMount, err := mountOf(l.target[1])
	if err != nil {
		return nil, err
	}
	if storeMount.ID == targetMount.ID {
		return l, nil
	}
	if storeMount.Major != targetMount.Major || storeMount.Minor != targetMount.Minor {
		return nil, fmt.Errorf("%s is on mount device %d:%d, the store %s on %d:%d: %w",
			target, targetMount.Major, targetMount.Minor, store, storeMount.Major, storeMount.Minor, ErrOtherFilesystem)
	}
	storeFS, targetFS := inFilesystem(storeMount, l.store[1]), inFilesystem(targetMount, l.target[1])
	via, err := commonMount(storeMount, storeFS, targetFS)
	if err != nil {
		return nil, fmt.Errorf("link from %s into %s: %w", store, target, err)
	}
	if l.mount, err = clone(via.Mountpoint); err != nil {
		return nil, fmt.Errorf("private clone of mount %s: %w", via.Mountpoint, err)
	}
	l.storeRel, _ = filepath.Rel(via.Root, storeFS)
	l.targetRel, _ = filepath.Rel(via.Root, targetFS)
	l.how = "a private clone of mount " + via.Mountpoint
	return l, nil
}

// String says how links are made, for logs.
func (l *Linker) String() string { return l.how }

// Link makes dst, below the target directory, a hard link to src, below
// the store.
func (l *Linker) Link(src, dst string) error {
	if l.mount == nil {
		return os.Link(src, dst)
	}
	s, ok := below(l.store, src)
	d, ok2 := below(l.target, dst)
	if !ok || !ok2 {
		return &os.LinkError{Op: "link", Old: src, New: dst, Err: fmt.Errorf("outside %s or %s: %w", l.store[0], l.target[0], unix.EXDEV)}
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return &os.LinkError{Op: "link", Old: src, New: dst, Err: os.ErrClosed}
	}
	fd := int(l.mount.Fd())
	if err := unix.Linkat(fd, filepath.Join(l.storeRel, s), fd, filepath.Join(l.targetRel, d), 0); err != nil {
		return &os.LinkError{Op: "link", Old: src, New: dst, Err: err}
	}
	return nil
}

// Close releases the private mount, if there is one, once the links
// being made are done. Links through it fail after it.
func (l *Linker) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.mount == nil {
		l.closed = true
		return nil
	}
	l.closed = true
	return l.mount.Close()
}

// below returns p relative to whichever form of dir it is below.
func below(dir []string, p string) (string, bool) {
	for _, d := range dir {
		if rel, err := filepath.Rel(d, p); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			return rel, true
		}
	}
	return "", false
}

// mountOf is the mount that path (symlinks resolved) is reached through.
func mountOf(path string) (*mountinfo.Info, error) {
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_MNT_ID, &st); err == nil && st.Mask&unix.STATX_MNT_ID != 0 {
		for _, m := range mounts {
			if uint64(m.ID) == st.Mnt_id {
				return m, nil
			}
		}
	}
	// Kernels before 5.8: the last mount (the one on top) on the longest
	// mount point that is a prefix of path.
	var found *mountinfo.Info
	for _, m := range mounts {
		if _, ok := below([]string{m.Mountpoint}, path); ok && (found == nil || len(m.Mountpoint) >= len(found.Mountpoint)) {
			found = m
		}
	}
	if found == nil {
		return nil, fmt.Errorf("no mount holds %s", path)
	}
	return found, nil
}

// inFilesystem is where path, reached through mount m, is within its
// filesystem.
func inFilesystem(m *mountinfo.Info, path string) string {
	rel, _ := below([]string{m.Mountpoint}, path)
	return filepath.Join(m.Root, rel)
}

// commonMount finds a mount of like's filesystem, reachable at its mount
// point, whose root holds both paths (paths within the filesystem).
func commonMount(like *mountinfo.Info, paths ...string) (*mountinfo.Info, error) {
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.Major != like.Major || m.Minor != like.Minor, false
	})
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	var best *mountinfo.Info
candidates:
	for _, m := range mounts {
		for _, p := range paths {
			if _, ok := below([]string{m.Root}, p); !ok {
				continue candidates
			}
		}
		if top, err := mountOf(m.Mountpoint); err != nil || top.ID != m.ID {
			continue // covered by another mount
		}
		if best == nil || len(m.Root) > len(best.Root) {
			best = m
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no mount of device %d:%d holds both %s: mount the filesystem's root somewhere (README, Install on a node)",
			like.Major, like.Minor, strings.Join(paths, " and "))
	}
	return best, nil
}

// clone returns a writable private copy of the mount at mountpoint
// (without the mounts below it), attached nowhere, in which no symlink is
// followed: a path through it cannot be turned by a symlink into the store
// its clone makes writable. Needs Linux 5.12 (open_tree, mount_setattr).
func clone(mountpoint string) (*os.File, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, mountpoint, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("open_tree: %w", err)
	}
	f := os.NewFile(uintptr(fd), mountpoint)
	// A read-only mount's clone is read-only too; links need it writable.
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSYMFOLLOW, Attr_clr: unix.MOUNT_ATTR_RDONLY}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		f.Close()
		return nil, fmt.Errorf("mount_setattr (Linux 5.12 or later): %w", err)
	}
	return f, nil
}
