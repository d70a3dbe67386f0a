package nixbuild

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/procdir"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild/storepath"
)

// GCRootsDir is where Nix looks for GC roots: every symlink into the store
// below it (in any subdirectory) keeps its target alive.
const GCRootsDir = "/nix/var/nix/gcroots"

// buildRootsDir holds the roots of this project's processes, one
// directory each (procdir): those of a process that died are removed by
// the next one.
var buildRootsDir = filepath.Join(GCRootsDir, "nixery-builds")

// Roots is a directory of Nix GC roots that this process made; Release
// removes it.
type Roots struct {
	dir   string
	owner *Builder
}

// Release drops the roots. Releasing nil Roots, or twice, does nothing.
func (r *Roots) Release() error {
	if r == nil || r.dir == "" {
		return nil
	}
	if r.owner != nil {
		r.owner.mu.Lock()
		delete(r.owner.roots, r.dir)
		r.owner.mu.Unlock()
	}
	dir := r.dir
	r.dir = ""
	return os.RemoveAll(dir)
}

// newRoots makes an empty directory of roots, which Close removes if it is
// not released by then.
func (b *Builder) newRoots() (*Roots, error) {
	own, err := procdir.Open(buildRootsDir, nil)
	if err != nil {
		return nil, fmt.Errorf("GC roots (this needs root, as Nix's gcroots directory does): %w", err)
	}
	dir, err := os.MkdirTemp(own.Path(), "roots-")
	if err != nil {
		return nil, fmt.Errorf("GC roots: %w", err)
	}
	b.mu.Lock()
	b.roots[dir] = struct{}{}
	b.mu.Unlock()
	return &Roots{dir: dir, owner: b}, nil
}

// Hold makes paths valid in the Nix store (realising those that are not,
// by substitution or from their derivers) and GC roots of this process
// until the Roots are released. A collection already running keeps them
// too. Paths that are not store paths are refused before Nix sees them.
func (b *Builder) Hold(ctx context.Context, paths []string) (*Roots, error) {
	roots, err := b.newRoots()
	if err != nil {
		return nil, err
	}
	if err := b.Root(ctx, roots.dir, paths); err != nil {
		roots.Release()
		return nil, err
	}
	return roots, nil
}

// Root makes paths valid in the Nix store (realising those that are not)
// and GC roots in dir, which must be below GCRootsDir and is created if
// needed. Paths that are not store paths are refused (errdefs
// ErrInvalidArgument), paths that cannot be made valid are ErrNotFound.
//
// It is safe against a collection running at the same time: the paths are
// first temporary roots of Nix's serve process (which tells a running
// collection), and only then permanent ones here.
func (b *Builder) Root(ctx context.Context, dir string, paths []string) error {
	paths = slices.Compact(slices.Sorted(slices.Values(paths)))
	if err := storepath.CheckAll(paths); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("GC roots: %w", err)
	}
	for attempt := 0; ; attempt++ {
		valid, held, release, err := b.store.tempRoots(ctx, paths)
		if err != nil {
			return err
		}
		err = b.rootValid(ctx, dir, paths, valid)
		ok := held()
		release()
		if err != nil || ok {
			return err
		}
		// The serve process died before the roots here existed: a
		// collection may have taken what it held. Ask again; what is
		// rooted here now cannot go any more.
		if attempt > 0 {
			return &BuildError{Stage: "hold", Err: errNotHeld}
		}
	}
}

// rootValid links the valid paths into dir and realises the others there.
func (b *Builder) rootValid(ctx context.Context, dir string, paths, valid []string) error {
	for _, p := range valid {
		link := filepath.Join(dir, filepath.Base(p))
		if err := os.Symlink(p, link); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("GC root for %s: %w", p, err)
		}
	}
	var missing []string
	for _, p := range paths {
		if !slices.Contains(valid, p) {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	b.caches.check(ctx)
	// nix-store makes the roots while it holds its own temporary ones.
	if _, err := b.limited(ctx, "realise", "nix-store", b.args(append([]string{"--realise", "--add-root", filepath.Join(dir, fmt.Sprintf("realised-%d", time.Now().UnixNano())), "--"}, missing...)...)...); err != nil {
		return fmt.Errorf("store paths not valid on this node, and not realisable: %v: %w (%w)", missing, errdefs.ErrNotFound, err)
	}
	return nil
}
