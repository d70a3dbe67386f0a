// Package linked writes store-path layers into directories as unpacking
// their tar would, without copying file data: files are hard links to the
// store's own inodes, which Nix keeps read-only (0444/0555, root-owned,
// mtime 1), exactly what the layer's tar would hold. A directory written so
// must only ever be a read-only layer (an overlay lower directory, which
// the kernel never writes; a copy's source): written through, it would
// write the store. Where links cannot be made (another filesystem than the
// store, or a file at the filesystem's link limit) a file is cloned
// (reflink) or, failing that, copied, and the log and a metric say so.
package linked

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/storelink"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// Writer writes store paths into layer directories below one directory
// (a snapshotter's root).
type Writer struct {
	root        string // where store paths are read, "/" but in tests
	storeDir    string // the store, which files are linked from
	dir         string // where layers are written (the snapshotter root)
	snapshotter string // whose layers, for metrics and logs
	parallel    int
	// linking finds how to link, once: at start, or where the store did
	// not exist yet (a fresh node), at the first layer.
	linking  sync.Once
	linker   *storelink.Linker // unused once copyOnly is set
	copyOnly atomic.Bool       // set once links proved impossible
	copied   atomic.Int64      // files copied, ever
}

// filesCopied counts store files copied into layers because they could
// not be linked: bytes written (and disk taken) that links would not cost.
var filesCopied = promauto.NewCounterVec(prometheus.CounterOpts{
	Namespace: "nixery", Name: "snapshot_files_copied_total",
	Help: "Store files copied (or cloned) into snapshots because they could not be hard-linked, by snapshotter.",
}, []string{"snapshotter"})

// Write writes paths (absolute store paths) below dir, a layer directory
// below the Writer's.
func (m *Writer) Write(ctx context.Context, dir string, paths []string) error {
	if _, err := os.Stat(dir); err != nil {
		return err // the layer directory is made by its snapshotter
	}
	m.linking.Do(func() { m.findLinks(ctx) })
	// Parent directories (/nix, /nix/store) as the tar layer has them.
	parents := map[string]bool{}
	for _, p := range paths {
		for d := filepath.Dir(p); d != "/" && d != "."; d = filepath.Dir(d) {
			parents[filepath.Join(dir, d)] = true
		}
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(p)), tarstream.ParentDirMode); err != nil {
			return err
		}
	}
	defer func() {
		for d := range parents {
			_ = os.Chtimes(d, tarstream.Epoch, tarstream.Epoch)
		}
	}()
	before := m.copied.Load()
	work := make(chan string)
	errs := make(chan error, len(paths))
	var wg sync.WaitGroup
	for i := 0; i < max(1, m.parallel); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range work {
				errs <- m.tree(dir, p)
			}
		}()
	}
	go func() {
		defer close(work)
		for _, p := range paths {
			select {
			case work <- p:
			case <-ctx.Done():
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	if err := ctx.Err(); err != nil {
		all = append(all, err)
	}
	if n := m.copied.Load() - before; n > 0 {
		// A cost the user pays without asking: say so each time.
		log.G(ctx).WithFields(log.Fields{"files": n, "snapshotter": m.snapshotter, "linking": m.Links()}).Warn("copied store files into the layer instead of linking them: the snapshotter root is not on the store's filesystem (linking false: keep it there, README, Install on a node), or the files may not be linked (immutable, append-only, at the link limit)")
	}
	return errors.Join(all...)
}

// tree writes store path p below the layer directory dir: files as
// links (or copies), directories and symlinks made as the tar layer would
// make them (tarstream.WalkStorePath).
func (m *Writer) tree(dir, p string) error {
	type made struct {
		path string
		mode fs.FileMode
	}
	var dirs []made
	err := tarstream.WalkStorePath(m.root, p, func(e tarstream.Entry) error {
		target := filepath.Join(dir, e.Path)
		switch e.Type {
		case fs.ModeDir:
			dirs = append(dirs, made{target, e.Mode})
			return os.Mkdir(target, 0o755)
		case fs.ModeSymlink:
			if err := os.Symlink(e.Target, target); err != nil {
				return err
			}
			if err := os.Lchown(target, 0, 0); err != nil {
				return err
			}
			epoch := unix.NsecToTimeval(tarstream.Epoch.UnixNano())
			return unix.Lutimes(target, []unix.Timeval{epoch, epoch})
		default:
			return m.file(e, target)
		}
	})
	if err != nil {
		return fmt.Errorf("materialise %s: %w", p, err)
	}
	// Directories last, deepest first: read-only and with the store's
	// mtime, as the tar layer would make them.
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Chmod(dirs[i].path, dirs[i].mode); err != nil {
			return err
		}
		if err := os.Chtimes(dirs[i].path, tarstream.Epoch, tarstream.Epoch); err != nil {
			return err
		}
	}
	return nil
}

// file links e's source to dst, or copies it there with e's mode: a file
// the store does not keep as the layer holds it (a store owned by a user,
// as single-user Nix makes it) is copied, so that the layer is its tar.
func (m *Writer) file(e tarstream.Entry, dst string) error {
	src, mode := e.Source, e.Mode
	if !m.copyOnly.Load() && e.AsInLayer {
		err := m.linker.Link(src, dst)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, syscall.EPERM) && unlinkable(src):
			// This file may not be linked (immutable or append-only);
			// others may.
		case linksImpossible(err):
			// A root that linking left (a mount moved): copy from now on,
			// and say so where links are watched.
			m.copyOnly.Store(true)
			storeLinkable.WithLabelValues(m.snapshotter).Set(0)
		case errors.Is(err, syscall.EMLINK):
			// This inode is full; others may not be.
		default:
			return err
		}
	}
	m.copied.Add(1)
	filesCopied.WithLabelValues(m.snapshotter).Inc()
	return copyFile(src, dst, mode)
}

// copyFile clones src to dst where the filesystem can share extents, and
// copies it otherwise, with mode and the store's mtime.
func copyFile(src, dst string, mode fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Chmod(dst, mode); err != nil {
		return err
	}
	return os.Chtimes(dst, tarstream.Epoch, tarstream.Epoch)
}

// storeLinkable says whether store files can be linked into a
// snapshotter's layers (1) or must be copied (0): as found when it
// started, or later when linking failed for good.
var storeLinkable = promauto.NewGaugeVec(prometheus.GaugeOpts{
	Namespace: "nixery", Name: "snapshot_store_linkable",
	Help: "1 if store files can be hard-linked into the snapshotter's layers, 0 if they are copied (another filesystem or mount).",
}, []string{"snapshotter"})

// Opt configures a Writer.
type Opt func(*Writer)

// WithStoreRoot reads store paths below dir instead of / (tests).
func WithStoreRoot(dir string) Opt { return func(m *Writer) { m.root = dir } }

// WithStore links from the store directory dir, not /nix/store below the
// root (tests).
func WithStore(dir string) Opt { return func(m *Writer) { m.storeDir = dir } }

// New returns a Writer of store paths into layer directories below dir,
// the layers of snapshotter, finding at start whether store files can be
// linked there (and how) or must be copied; it says which in the log and
// the storeLinkable metric.
func New(ctx context.Context, snapshotter, dir string, opts ...Opt) *Writer {
	m := &Writer{root: "/", dir: dir, snapshotter: snapshotter, parallel: 4}
	for _, opt := range opts {
		opt(m)
	}
	if _, err := os.Stat(m.store()); err != nil {
		log.G(ctx).WithError(err).Info("no Nix store yet: how store files are linked into layers is found at the first layer")
		return m
	}
	m.linking.Do(func() { m.findLinks(ctx) })
	return m
}

func (m *Writer) store() string {
	if m.storeDir != "" {
		return m.storeDir
	}
	return filepath.Join(m.root, "nix", "store")
}

// StoreRoot is where the Writer reads store paths: "/" but in tests.
func (m *Writer) StoreRoot() string { return m.root }

// Links says whether store files are linked (rather than copied), as far
// as is known yet.
func (m *Writer) Links() bool { return !m.copyOnly.Load() }

// Copied counts the files this Writer copied because it could not link.
func (m *Writer) Copied() int64 { return m.copied.Load() }

// findLinks finds how store files are linked into layers, or that they
// cannot be, and says which.
func (m *Writer) findLinks(ctx context.Context) {
	l, err := storelink.New(m.store(), m.dir)
	if err == nil {
		err = probe(l, m.store(), m.dir)
	}
	if err != nil {
		storeLinkable.WithLabelValues(m.snapshotter).Set(0)
		m.copyOnly.Store(true)
		log.G(ctx).WithError(err).WithFields(log.Fields{"root": m.dir, "snapshotter": m.snapshotter}).Warn("store files cannot be hard-linked into this snapshotter root: layers will be copied; put the root on the store's filesystem (README, Install on a node)")
		if l != nil {
			l.Close()
		}
		return
	}
	storeLinkable.WithLabelValues(m.snapshotter).Set(1)
	m.linker = l
	log.G(ctx).WithFields(log.Fields{"root": m.dir, "snapshotter": m.snapshotter}).Infof("store files are linked into layers through %s", l)
}

// linksImpossible says a link failed in a way that no other file will
// escape: another filesystem, links forbidden (but to a file that may not
// be linked, unlinkable), a read-only mount.
func linksImpossible(err error) bool {
	return errors.Is(err, syscall.EXDEV) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EROFS)
}

// probe links a file of the store into dir through l and removes the
// link. Only a failure that every link would meet counts: a file that is
// gone (a build's lock, collected) or full of links says nothing, and with
// no store file to try it cannot tell either.
func probe(l *storelink.Linker, store, dir string) error {
	file, ok := someStoreFile(store, 3)
	if !ok {
		return nil
	}
	link := filepath.Join(dir, fmt.Sprintf(".link-probe-%d", os.Getpid()))
	_ = os.Remove(link)
	err := l.Link(file, link)
	_ = os.Remove(link)
	if err != nil && (!linksImpossible(err) || errors.Is(err, syscall.EPERM) && unlinkable(file)) {
		return nil
	}
	return err
}

// unlinkable says whether file is one that link(2) refuses by itself:
// immutable or append-only (chattr +i, +a).
func unlinkable(file string) bool {
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, file, unix.AT_SYMLINK_NOFOLLOW, 0, &st); err != nil {
		return false
	}
	return st.Attributes&(unix.STATX_ATTR_IMMUTABLE|unix.STATX_ATTR_APPEND) != 0
}

// Close releases what linking holds; layers written after it are copied.
func (m *Writer) Close() error {
	m.copyOnly.Store(true)
	m.linking.Do(func() {}) // none found after this
	if m.linker == nil {
		return nil
	}
	return m.linker.Close()
}

// someStoreFile finds a regular file at most depth directories below dir.
func someStoreFile(dir string, depth int) (string, bool) {
	f, err := os.Open(dir)
	if err != nil {
		return "", false
	}
	entries, _ := f.ReadDir(64)
	f.Close()
	for _, e := range entries {
		if e.Type().IsRegular() && !strings.HasPrefix(e.Name(), ".") {
			return filepath.Join(dir, e.Name()), true
		}
	}
	if depth > 0 {
		for _, e := range entries {
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				if p, ok := someStoreFile(filepath.Join(dir, e.Name()), depth-1); ok {
					return p, true
				}
			}
		}
	}
	return "", false
}

// Roots hands out the Writer of each snapshotter root that layers are
// written in, made at the first layer written there. The zero Roots is
// ready to use.
type Roots struct {
	// Store is the store files are linked from, if not /nix/store (tests).
	Store  string
	mu     sync.Mutex
	byRoot map[string]*Writer
}

// Writer is the Writer of layers of snapshotter into dir, one snapshot's
// own directory.
func (r *Roots) Writer(ctx context.Context, snapshotter, dir string) *Writer {
	// A snapshot's directory is one of many below the snapshotter's root:
	// <root>/snapshots/<id>/fs (overlayfs), <root>/snapshots/<id> (native).
	root := filepath.Dir(filepath.Dir(dir))
	r.mu.Lock()
	defer r.mu.Unlock()
	if w, ok := r.byRoot[root]; ok {
		return w
	}
	if r.byRoot == nil {
		r.byRoot = map[string]*Writer{}
	}
	var opts []Opt
	if r.Store != "" {
		opts = append(opts, WithStore(r.Store))
	}
	w := New(ctx, snapshotter, root, opts...)
	r.byRoot[root] = w
	return w
}

// Close closes the Writers handed out: layers written after it are copied.
func (r *Roots) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, w := range r.byRoot {
		errs = append(errs, w.Close())
	}
	return errors.Join(errs...)
}
