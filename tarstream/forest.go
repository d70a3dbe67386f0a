package tarstream

import (
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
)

// node is a directory of the symlink forest, a symlink when target is
// set, or a file of the forest's own (the account files) when file is.
type node struct {
	target   string
	children map[string]*node
	// src is the store directory a directory node came from, and shared
	// says another package (or this package's forest itself) added to it.
	src    string
	shared bool
	file   bool
	data   string
	// mode and owner are a directory's or file's own; mode 0 is
	// ParentDirMode.
	mode     int64
	uid, gid uint32
}

// own makes n a directory or file of the forest's own, whatever the
// packages put there.
func (n *node) own(o node) {
	o.shared = true
	*n = o
}

func (n *node) child(name string) *node {
	if n.children == nil {
		n.children = map[string]*node{}
	}
	c, ok := n.children[name]
	if !ok {
		c = &node{}
		n.children[name] = c
	}
	return c
}

// skipped are package entries that are build metadata, not runtime files.
var skipped = map[string]bool{"nix-support": true}

// WriteSymlinkForest writes the top layer of an image: the packages' trees
// merged under /, as nixpkgs' buildEnv does: directories that several
// packages provide are created and hold symlinks to each package's entries;
// a directory only one package provides is itself a symlink into the store
// (below the top level, which stays real directories for the runtime and
// for layers added on top). Where packages collide, the first in the given
// order wins. It also adds /tmp (mode 1777) and, when a package provides
// bin/env, /usr/bin/env for #! lines. An image user other than root
// (WithUser) gets /etc/passwd, /etc/group and a home directory it owns,
// which win over what packages have there.
func WriteSymlinkForest(w io.Writer, packages []string, opts ...Opt) error {
	o := newOptions(opts)
	root := &node{}
	storeDir := "" // the packages' store directory, /nix/store
	for _, pkg := range packages {
		if !path.IsAbs(pkg) || path.Clean(pkg) != pkg {
			return fmt.Errorf("package path %q is not a clean absolute path: %w", pkg, errdefs.ErrInvalidArgument)
		}
		storeDir = path.Dir(pkg)
		info, err := os.Lstat(o.onDisk(pkg))
		if err != nil {
			return fmt.Errorf("package %s: %w", pkg, err)
		}
		if !info.IsDir() {
			continue // a single-file package has nothing to link into /
		}
		if err := merge(root, o.onDisk(pkg), pkg, true); err != nil {
			return fmt.Errorf("package %s: %w", pkg, err)
		}
	}

	if env := lookup(root, "bin", "env"); env != nil && env.target != "" {
		if bin := lookup(root, "usr", "bin"); bin == nil || bin.target == "" {
			if usr := root.child("usr"); usr.target == "" {
				usr.shared = true
				bin := usr.child("bin")
				bin.shared = true
				if e := bin.child("env"); e.target == "" && e.children == nil {
					e.target = env.target
				}
			}
		}
	}
	if tmp, ok := root.children["tmp"]; !ok || tmp.target == "" {
		tmp = root.child("tmp")
		tmp.shared, tmp.mode = true, 0o1777
	}
	if !o.user.Root() {
		if err := addAccounts(root, o, storeDir); err != nil {
			return err
		}
	}
	for _, c := range root.children {
		collapse(c, 1)
	}

	tw := newWriter(w, o)
	if err := emit(tw, root, ""); err != nil {
		return err
	}
	return tw.close()
}

// merge adds the entries of directory dir (store location target) to n.
func merge(n *node, dir, target string, top bool) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if top && skipped[e.Name()] {
			continue
		}
		if err := Check(filepath.Join(dir, e.Name()), e.Type()); err != nil {
			return err
		}
		c := n.child(e.Name())
		switch {
		case c.target != "":
			// Taken by an earlier package.
		case e.IsDir():
			if c.src == "" && c.children == nil {
				c.src = path.Join(target, e.Name())
			} else {
				c.shared = true
			}
			if err := merge(c, filepath.Join(dir, e.Name()), path.Join(target, e.Name()), false); err != nil {
				return err
			}
		case c.children == nil:
			c.target = path.Join(target, e.Name())
		}
	}
	return nil
}

func emit(tw *writer, n *node, name string) error {
	for _, k := range slices.Sorted(maps.Keys(n.children)) {
		c := n.children[k]
		entry := path.Join(name, k)
		if c.target != "" {
			if err := tw.symlink(entry, c.target); err != nil {
				return err
			}
			continue
		}
		mode := c.mode
		if mode == 0 {
			mode = ParentDirMode
		}
		if c.file {
			if err := tw.data(entry, mode, c.data); err != nil {
				return err
			}
			continue
		}
		if err := tw.ownedDir(entry, mode, c.uid, c.gid); err != nil {
			return err
		}
		if err := emit(tw, c, entry); err != nil {
			return err
		}
	}
	return nil
}

// lookup follows names from n, or returns nil.
func lookup(n *node, names ...string) *node {
	for _, name := range names {
		if n == nil || n.children == nil {
			return nil
		}
		n = n.children[name]
	}
	return n
}

// collapse turns a directory that only one package provides, below the top
// level, into a symlink to that package's directory. It reports whether n
// is such a directory (or a symlink) itself.
func collapse(n *node, depth int) bool {
	if n.target != "" {
		return true
	}
	pure := !n.shared && n.src != ""
	for _, c := range n.children {
		if !collapse(c, depth+1) {
			pure = false
		}
	}
	if pure && depth >= 2 {
		n.target, n.children = n.src, nil
	}
	return pure
}

// addAccounts gives the forest the account files and home of o.user. A
// package's /etc or /home that is a symlink is unfolded first, so that its
// other entries stay.
func addAccounts(root *node, o options, storeDir string) error {
	u := o.user
	etc, home := root.child("etc"), root.child("home")
	for _, n := range []*node{etc, home} {
		if err := unfold(n, o, storeDir); err != nil {
			return err
		}
		n.shared = true
	}
	etc.child("passwd").own(node{file: true, data: u.passwd(), mode: 0o644})
	etc.child("group").own(node{file: true, data: u.group(), mode: 0o644})
	home.child(u.Name).own(node{mode: 0o755, uid: u.UID, gid: u.GID})
	root.child("root").own(node{mode: 0o700})
	return nil
}

// unfold turns n, a symlink to a directory of the store, into a directory
// of symlinks to that directory's entries. A symlink to anything else, or
// out of the store (through any of its components), goes: the image must
// not depend on the host.
func unfold(n *node, o options, storeDir string) error {
	if n.target == "" {
		return nil
	}
	dir, ok := resolveInStore(o, storeDir, n.target)
	n.target = ""
	if !ok {
		return nil
	}
	return merge(n, o.onDisk(dir), dir, false)
}

// resolveInStore follows p, while it is a symlink, below o's root (where an
// absolute target means the store's own location, not the host's), and
// reports where it leads if that is a directory inside storeDir reached
// through no further symlink.
func resolveInStore(o options, storeDir, p string) (string, bool) {
	inStore := func(p string) bool { return strings.HasPrefix(p, storeDir+"/") }
	for range 40 { // as the kernel's bound on nested symlinks
		target, err := os.Readlink(o.onDisk(p))
		if err != nil {
			break
		}
		if !path.IsAbs(target) {
			target = path.Join(path.Dir(p), target)
		}
		if p = path.Clean(target); !inStore(p) {
			return "", false
		}
	}
	if !inStore(p) {
		return "", false
	}
	cur := storeDir
	for _, c := range strings.Split(strings.TrimPrefix(p, storeDir+"/"), "/") {
		cur = path.Join(cur, c)
		info, err := os.Lstat(o.onDisk(cur))
		if err != nil || info.Mode()&os.ModeSymlink != 0 {
			return "", false
		}
		if cur == p {
			return p, info.IsDir()
		}
	}
	return "", false
}
