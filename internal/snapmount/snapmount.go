// Package snapmount reads the mounts of containerd snapshots: where an
// active snapshot's own files are written, and how one that failed is
// discarded.
package snapmount

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
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
