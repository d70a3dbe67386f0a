// Package snapmount reads the mounts of containerd snapshots: where an
// active snapshot's own files are written, and how one that failed is
// discarded.
package snapmount

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/procdir"
)

// Writable is the directory that holds the own changes of an active
// snapshot with mounts, where they are one writable bind mount (its
// source) or one overlay (its upperdir, with lowers beneath, and overlay
// set); "" for any other mounts, which must be mounted to be written.
func Writable(mounts []mount.Mount) (dir string, lowers []string, overlay bool) {
	if len(mounts) != 1 {
		return "", nil, false
	}
	m := mounts[0]
	switch m.Type {
	case "bind":
		if !slices.Contains(m.Options, "ro") {
			return m.Source, nil, false
		}
	case "overlay":
		for _, o := range m.Options {
			if d, ok := strings.CutPrefix(o, "upperdir="); ok {
				dir = d
			} else if l, ok := strings.CutPrefix(o, "lowerdir="); ok {
				lowers = strings.Split(l, ":")
			}
		}
		return dir, lowers, dir != ""
	}
	return "", nil, false
}

// EmptyDir removes what dir holds, keeping dir: the files of a snapshot
// that failed, before it is removed. On a full disk the snapshotter cannot
// even record the removal until they are gone.
func EmptyDir(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		_ = os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

// Remover removes snapshots: a snapshots.Snapshotter.
type Remover interface {
	Remove(ctx context.Context, key string) error
}

// Discard removes the active snapshot key, with mounts, that failed: its
// files first (EmptyDir), then the snapshot, even if ctx has ended.
func Discard(ctx context.Context, sn Remover, key string, mounts []mount.Mount) {
	if dir, _, _ := Writable(mounts); dir != "" {
		EmptyDir(dir)
	}
	if err := sn.Remove(context.WithoutCancel(ctx), key); err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("removing unfinished snapshot")
	}
}

// mountsDir holds, below a work directory, the temporary mount points of
// this project's processes, one directory each (procdir).
func mountsDir(workDir string) string { return filepath.Join(workDir, "mounts") }

// SweepTempMounts unmounts and removes the temporary mounts of processes
// that are gone, below workDir.
func SweepTempMounts(workDir string) { procdir.Sweep(mountsDir(workDir), unmountBelow) }

// tempMounts is where containerd's temporary mounts go (a setting of the
// whole process).
var tempMounts struct {
	once sync.Once
	err  error
}

// UseTempMounts makes containerd's temporary mounts (unpacking into
// snapshotters that are not plain directories) in this process's own
// directory below workDir, where the next process unmounts them if this
// one dies; without a work directory, containerd's default place.
func UseTempMounts(workDir string) error {
	if workDir == "" {
		return nil
	}
	tempMounts.once.Do(func() {
		dir, err := procdir.Open(mountsDir(workDir), unmountBelow)
		if err == nil {
			err = mount.SetTempMountLocation(dir.Path())
		}
		tempMounts.err = err
	})
	return tempMounts.err
}

// unmountBelow unmounts everything mounted below dir, deepest first, then
// removes the empty directories: never a file system that is still
// mounted.
func unmountBelow(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int { return len(b.Mountpoint) - len(a.Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmounting %s: %w", m.Mountpoint, err)
		}
	}
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		} else if err == nil {
			_ = os.Remove(p) // the lock file
		}
		return nil
	})
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	for _, d := range dirs {
		_ = os.Remove(d)
	}
	return nil
}
