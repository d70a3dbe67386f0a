// Package procdir gives a process a directory of its own that outlives it
// only until the next process looks: state kept while working (Nix GC
// roots, temporary files, mount points) that a crash would otherwise leave
// behind forever.
//
// A process's directory holds a lock file it keeps locked while it runs
// (flock, which the kernel releases when the process dies, in whatever PID
// namespace it ran); Open sweeps the directories whose lock is free.
package procdir

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/privdir"
)

const (
	lockName = ".lock"
	// staging prefixes a directory being made: not locked yet, so Sweep
	// must not mistake it for one whose owner is gone.
	staging = ".new-"
)

// Dir is a directory owned by this process.
type Dir struct {
	path  string
	lock  *os.File // kept open (and locked) for the life of the process
	owner string
}

// Path is the directory's path.
func (d *Dir) Path() string { return d.path }

// Owner names the lock file that says whether the directory's process
// lives, for records kept elsewhere (containerd leases) to be swept the
// same way: see Alive.
func (d *Dir) Owner() string { return d.owner }

type opened struct {
	once sync.Once
	dir  *Dir
	err  error
}

var (
	mu   sync.Mutex
	dirs = map[string]*opened{}
)

// Cleanup removes what a process that is gone left in its directory; the
// default removes it all. It must not cross mount points.
type Cleanup func(dir string) error

// Open returns this process's directory in parent (made 0700 with its
// parents), the same for every call with that parent. The first call
// sweeps the directories of processes that are gone, with cleanup (nil
// means os.RemoveAll). parent must be root's alone (privdir): another
// user who could rename what it holds could make root write, remove or
// trust what they choose.
func Open(parent string, cleanup Cleanup) (*Dir, error) {
	mu.Lock()
	o, ok := dirs[parent]
	if !ok {
		o = &opened{}
		dirs[parent] = o
	}
	mu.Unlock()
	o.once.Do(func() {
		if cleanup == nil {
			cleanup = os.RemoveAll
		}
		o.dir, o.err = open(parent, cleanup)
	})
	return o.dir, o.err
}

func open(parent string, cleanup Cleanup) (*Dir, error) {
	if err := privdir.Make(parent); err != nil {
		return nil, fmt.Errorf("directory for this process in %s: %w", parent, err)
	}
	Sweep(parent, cleanup)
	var suffix [8]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		return nil, err
	}
	name := fmt.Sprintf("%d-%s", os.Getpid(), hex.EncodeToString(suffix[:]))
	tmp := filepath.Join(parent, staging+name)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return nil, fmt.Errorf("directory for this process in %s: %w", parent, err)
	}
	lock, err := os.OpenFile(filepath.Join(tmp, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err == nil {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	}
	final := filepath.Join(parent, name)
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		os.RemoveAll(tmp)
		return nil, fmt.Errorf("directory for this process in %s: %w", parent, err)
	}
	// The lock stays held across the rename: it is the same file.
	return &Dir{path: final, lock: lock, owner: filepath.Join(final, lockName)}, nil
}

// Sweep cleans up the directories in parent whose process is gone. A
// directory whose cleanup fails stays, for a later sweep.
func Sweep(parent string, cleanup Cleanup) {
	entries, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(parent, e.Name())
		if strings.HasPrefix(e.Name(), staging) {
			// Made by a process that died before it took the lock (a live
			// one takes it in microseconds).
			if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > time.Minute {
				_ = cleanup(dir)
			}
			continue
		}
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR, 0)
		if err != nil {
			continue // not one of ours, or half made: leave it
		}
		if unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			// Its process is gone: clean up while holding its lock, so
			// that no other sweeper does at the same time.
			_ = cleanup(dir)
		}
		lock.Close()
	}
}

// Alive reports whether the process that owns the lock file owner (a
// Dir's Owner) still runs.
func Alive(owner string) bool {
	lock, err := os.OpenFile(owner, os.O_RDWR, 0)
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	defer lock.Close()
	return unix.Flock(int(lock.Fd()), unix.LOCK_SH|unix.LOCK_NB) != nil
}
