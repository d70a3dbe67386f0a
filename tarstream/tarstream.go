// Package tarstream writes reproducible, uncompressed OCI layer tars of Nix
// store paths and of the symlink forest that makes packages appear under /.
//
// Only the file tree's content and executable bits reach the tar: owners
// are 0, times fixed, entries in a fixed order and the format chosen by
// Go's archive/tar from the names alone, so the same store paths give the
// same bytes on every machine. Layers are streamed; nothing is buffered.
package tarstream

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// epoch is the modification time of every entry: Nix's own store mtime.
var epoch = time.Unix(1, 0)

const (
	// storeMode and storeExecMode are the permissions Nix gives store files.
	storeMode     = 0o444
	storeExecMode = 0o555
	storeDirMode  = 0o555
	// parentDirMode is for directories that exist outside the store
	// (/nix, /nix/store, /bin, ...).
	parentDirMode = 0o755
)

type options struct {
	root string
}

// Opt adjusts how layers are read.
type Opt func(*options)

// WithRoot reads store paths below dir instead of /, for stores that are
// not mounted at their logical location (chroot stores, tests).
func WithRoot(dir string) Opt { return func(o *options) { o.root = dir } }

func newOptions(opts []Opt) options {
	o := options{root: "/"}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

func (o options) onDisk(p string) string { return filepath.Join(o.root, p) }

// writer emits normalised entries and the parent directories they need.
type writer struct {
	tw      *tar.Writer
	created map[string]bool
}

func newWriter(w io.Writer) *writer {
	return &writer{tw: tar.NewWriter(w), created: map[string]bool{}}
}

func (w *writer) header(typ byte, name string, mode int64) *tar.Header {
	return &tar.Header{Typeflag: typ, Name: name, Mode: mode, ModTime: epoch}
}

// parents writes directory entries for the parents of name that are not
// in the layer yet.
func (w *writer) parents(name string) error {
	dir := path.Dir(strings.TrimSuffix(name, "/"))
	if dir == "." || w.created[dir] {
		return nil
	}
	if err := w.parents(dir); err != nil {
		return err
	}
	return w.dir(dir, parentDirMode)
}

func (w *writer) dir(name string, mode int64) error {
	if w.created[name] {
		return nil
	}
	if err := w.parents(name); err != nil {
		return err
	}
	w.created[name] = true
	return w.tw.WriteHeader(w.header(tar.TypeDir, name+"/", mode))
}

func (w *writer) symlink(name, target string) error {
	if err := w.parents(name); err != nil {
		return err
	}
	h := w.header(tar.TypeSymlink, name, 0o777)
	h.Linkname = target
	return w.tw.WriteHeader(h)
}

func (w *writer) file(name string, mode int64, src string, size int64) error {
	if err := w.parents(name); err != nil {
		return err
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	h := w.header(tar.TypeReg, name, mode)
	h.Size = size
	if err := w.tw.WriteHeader(h); err != nil {
		return err
	}
	n, err := io.Copy(w.tw, f)
	if err != nil {
		return fmt.Errorf("reading %s: %w", src, err)
	}
	if n != size {
		return fmt.Errorf("%s changed size while being read (%d, then %d bytes)", src, size, n)
	}
	return nil
}

func (w *writer) close() error { return w.tw.Close() }

// entryName is the tar name of an absolute path: relative, as OCI layers
// expect.
func entryName(p string) string { return strings.TrimPrefix(path.Clean(p), "/") }

// WriteStorePaths writes a layer holding the given store paths (absolute,
// e.g. /nix/store/...-htop-3.2.2) with every parent directory.
//
// Hard links between store files (as `nix-store --optimise` makes) are
// written as separate files: whether two files are linked differs from
// machine to machine, and the layer must not.
func WriteStorePaths(w io.Writer, paths []string, opts ...Opt) error {
	o := newOptions(opts)
	tw := newWriter(w)
	for _, p := range paths {
		if !path.IsAbs(p) || path.Clean(p) != p {
			return fmt.Errorf("store path %q is not a clean absolute path: %w", p, errdefs.ErrInvalidArgument)
		}
		if err := writeTree(tw, o.onDisk(p), entryName(p)); err != nil {
			return fmt.Errorf("store path %s: %w", p, err)
		}
	}
	return tw.close()
}

// writeTree writes src (file, directory or symlink) as name, recursively,
// entries of each directory in name order.
func writeTree(tw *writer, src, name string) error {
	return filepath.WalkDir(src, func(file string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, file)
		if err != nil {
			return err
		}
		entry := path.Join(name, filepath.ToSlash(rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch mode := info.Mode(); {
		case mode.IsDir():
			return tw.dir(entry, storeDirMode)
		case mode&fs.ModeSymlink != 0:
			target, err := os.Readlink(file)
			if err != nil {
				return err
			}
			return tw.symlink(entry, target)
		case mode.IsRegular():
			perm := int64(storeMode)
			if mode&0o111 != 0 {
				perm = storeExecMode
			}
			return tw.file(entry, perm, file, info.Size())
		default:
			return fmt.Errorf("%s is a %s, which a Nix store path cannot hold: %w", file, mode.Type(), errdefs.ErrInvalidArgument)
		}
	})
}
