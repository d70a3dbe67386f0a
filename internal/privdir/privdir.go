// Package privdir checks that a path can be changed by root alone: no
// other user owns it or a directory above it, and none of those is
// writable by others (but for sticky ones, such as /tmp). What such a path
// holds was put there by root: the daemon's sockets, the record of the
// layers this node built, the directories of its processes.
package privdir

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Check refuses path if a user other than root (or this process's) owns
// it or a directory above it, or could write them.
func Check(path string) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return err
	}
	for p := real; ; p = filepath.Dir(p) {
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("%s: no owner", p)
		}
		if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
			return fmt.Errorf("%s belongs to uid %d, not root", p, st.Uid)
		}
		others := fi.Mode().Perm()&0o022 != 0
		if fi.IsDir() && others && (p == real || fi.Mode()&os.ModeSticky == 0) {
			return fmt.Errorf("%s can be written by others (mode %v)", p, fi.Mode().Perm())
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// Make creates dir (0700, with its parents) if needed and checks it.
func Make(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return Check(dir)
}
