// Package tarstream writes reproducible, uncompressed OCI layer tars of Nix
// store paths and of the symlink forest that makes packages appear under /.
//
// Only the file tree's content and executable bits reach the tar: owners
// are 0 (but the home of an image's user), times fixed, entries in a fixed order and the format chosen by
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
	"syscall"
	"time"

	"github.com/containerd/errdefs"
)

// What a store file becomes in an image, whoever makes the layer: these
// tars, or the nix snapshotter linking the store's own files (which Nix
// keeps exactly so). One rule, so that an image is the same everywhere.
const (
	// FileMode and ExecMode are the permissions Nix gives store files;
	// DirMode its directories'.
	FileMode = 0o444
	ExecMode = 0o555
	DirMode  = 0o555
	// ParentDirMode is for directories that exist outside the store
	// (/nix, /nix/store, /bin, ...).
	ParentDirMode = 0o755
)

// Epoch is the modification time of every entry: Nix's own store mtime.
var Epoch = time.Unix(1, 0)

// Mode is the permission of a store file, directory or symlink of mode m
// in a layer.
func Mode(m fs.FileMode) fs.FileMode {
	switch {
	case m.IsDir():
		return DirMode
	case m&fs.ModeSymlink != 0:
		return 0o777
	case m&0o111 != 0:
		return ExecMode
	}
	return FileMode
}

// whiteoutPrefix marks OCI whiteouts: a layer entry so named deletes a
// file of the layers below instead of being one.
const whiteoutPrefix = ".wh."

// Check refuses what a layer cannot hold as it is in the store: file
// types other than directories, regular files and symlinks, and names
// that layers reserve for whiteouts (.wh.*), which unpacking would turn
// into deletions. file names the entry for the error.
func Check(file string, m fs.FileMode) error {
	if strings.HasPrefix(filepath.Base(file), whiteoutPrefix) {
		return fmt.Errorf("%s: names starting with %q are whiteouts in image layers, so no image can hold this file: %w", file, whiteoutPrefix, errdefs.ErrInvalidArgument)
	}
	if !m.IsDir() && !m.IsRegular() && m&fs.ModeSymlink == 0 {
		return fmt.Errorf("%s is a %s, which a Nix store path cannot hold: %w", file, m.Type(), errdefs.ErrInvalidArgument)
	}
	return nil
}

type options struct {
	root string
	skip int64
	user User
}

// Opt adjusts how layers are read.
type Opt func(*options)

// WithRoot reads store paths below dir instead of /, for stores that are
// not mounted at their logical location (chroot stores, tests).
func WithRoot(dir string) Opt { return func(o *options) { o.root = dir } }

// Skip leaves out the first n bytes of the layer (a range request): files
// whose content lies in them are not read. The layout is deterministic,
// so what follows is exactly the rest of the whole layer.
func Skip(n int64) Opt { return func(o *options) { o.skip = n } }

// WithUser makes the symlink forest an image's that runs as u
// (WriteSymlinkForest); store path layers are the same for every user.
func WithUser(u User) Opt { return func(o *options) { o.user = u } }

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
	out     *skipWriter
	created map[string]bool
}

func newWriter(w io.Writer, o options) *writer {
	out := &skipWriter{w: w, skip: o.skip}
	return &writer{tw: tar.NewWriter(out), out: out, created: map[string]bool{}}
}

// skipWriter drops the first skip bytes written to it.
type skipWriter struct {
	w    io.Writer
	skip int64
}

func (s *skipWriter) Write(p []byte) (int, error) {
	if s.skip >= int64(len(p)) {
		s.skip -= int64(len(p))
		return len(p), nil
	}
	n, err := s.w.Write(p[s.skip:])
	n += int(s.skip)
	s.skip = 0
	return n, err
}

// openFile opens store files (a test watches it).
var openFile = os.Open

// zeros stand in for file content that a skipWriter drops anyway.
var zeros = make([]byte, 256<<10)

func writeZeros(w io.Writer, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := w.Write(zeros[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

func (w *writer) header(typ byte, name string, mode int64) *tar.Header {
	return &tar.Header{Typeflag: typ, Name: name, Mode: mode, ModTime: Epoch}
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
	return w.dir(dir, ParentDirMode)
}

func (w *writer) dir(name string, mode int64) error { return w.ownedDir(name, mode, 0, 0) }

// ownedDir writes a directory owned by uid and gid.
func (w *writer) ownedDir(name string, mode int64, uid, gid uint32) error {
	if w.created[name] {
		return nil
	}
	if err := w.parents(name); err != nil {
		return err
	}
	w.created[name] = true
	h := w.header(tar.TypeDir, name+"/", mode)
	h.Uid, h.Gid = int(uid), int(gid)
	return w.tw.WriteHeader(h)
}

// data writes a file whose content is data.
func (w *writer) data(name string, mode int64, data string) error {
	if err := w.parents(name); err != nil {
		return err
	}
	h := w.header(tar.TypeReg, name, mode)
	h.Size = int64(len(data))
	if err := w.tw.WriteHeader(h); err != nil {
		return err
	}
	_, err := io.WriteString(w.tw, data)
	return err
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
	h := w.header(tar.TypeReg, name, mode)
	h.Size = size
	if err := w.tw.WriteHeader(h); err != nil {
		return err
	}
	// What a range leaves out is not read: zeros in its place are dropped.
	skipped := min(w.out.skip, size)
	if skipped == size {
		return writeZeros(w.tw, size)
	}
	f, err := openFile(src)
	if err != nil {
		return err
	}
	defer f.Close()
	if skipped > 0 {
		if _, err := f.Seek(skipped, io.SeekStart); err != nil {
			return err
		}
		if err := writeZeros(w.tw, skipped); err != nil {
			return err
		}
	}
	n, err := io.Copy(w.tw, f)
	n += skipped
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
	tw := newWriter(w, o)
	for _, p := range paths {
		if !path.IsAbs(p) || path.Clean(p) != p {
			return fmt.Errorf("store path %q is not a clean absolute path: %w", p, errdefs.ErrInvalidArgument)
		}
		if err := writeTree(tw, o.root, p); err != nil {
			return fmt.Errorf("store path %s: %w", p, err)
		}
	}
	return tw.close()
}

// writeTree writes the store path p, read below root, recursively.
func writeTree(tw *writer, root, p string) error {
	return WalkStorePath(root, p, func(e Entry) error {
		name := entryName(e.Path)
		switch e.Type {
		case fs.ModeDir:
			return tw.dir(name, int64(e.Mode))
		case fs.ModeSymlink:
			return tw.symlink(name, e.Target)
		default:
			return tw.file(name, int64(e.Mode), e.Source, e.Size)
		}
	})
}

// Entry is one file of a store path as a layer holds it.
type Entry struct {
	Path   string      // in the image: /nix/store/…-htop-3.2.2/bin/htop
	Source string      // where it is read
	Type   fs.FileMode // fs.ModeDir, fs.ModeSymlink, or 0 for a regular file
	Mode   fs.FileMode // its permissions in a layer
	Size   int64       // of a regular file
	Target string      // of a symlink
	// AsInLayer says the file on disk is owned by root, with the layer's
	// permissions and time (as Nix keeps its store): a hard link to it is
	// what unpacking the layer would make.
	AsInLayer bool
}

// WalkStorePath calls fn with each file of store path p (absolute), read
// below root ("/" but in tests): p first, a directory before what it
// holds, a directory's entries in name order. What it passes is what
// every layer holds of a store file, whoever writes the layer (Check,
// Mode), so that an image is the same on every snapshotter.
func WalkStorePath(root, p string, fn func(Entry) error) error {
	src := filepath.Join(root, p)
	return filepath.WalkDir(src, func(file string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, file)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode()
		if err := Check(file, mode); err != nil {
			return err
		}
		e := Entry{Path: path.Join(p, filepath.ToSlash(rel)), Source: file, Type: mode.Type(), Mode: Mode(mode)}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			e.AsInLayer = st.Uid == 0 && st.Gid == 0 && mode.Perm() == e.Mode && info.ModTime().Equal(Epoch)
		}
		switch {
		case mode.IsDir():
		case mode&fs.ModeSymlink != 0:
			if e.Target, err = os.Readlink(file); err != nil {
				return err
			}
		default:
			e.Type, e.Size = 0, info.Size()
		}
		return fn(e)
	})
}
