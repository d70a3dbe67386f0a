package privdir

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCheck(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make files of another user")
	}
	dir := t.TempDir()
	if err := Make(filepath.Join(dir, "ok", "deeper")); err != nil {
		t.Errorf("a directory of root's: %v", err)
	}
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if err := Check(open); err == nil {
		t.Error("a world-writable directory passed")
	}
	if err := Make(filepath.Join(open, "below")); err == nil {
		t.Error("a directory below a world-writable one passed")
	}
	theirs := filepath.Join(dir, "theirs")
	os.Mkdir(theirs, 0o755)
	os.Chown(theirs, 65534, 65534)
	if err := Check(theirs); err == nil {
		t.Error("a directory of uid 65534 passed")
	}
	link := filepath.Join(dir, "link")
	os.Symlink(theirs, link)
	if err := Check(link); err == nil {
		t.Error("a symlink to a directory of uid 65534 passed")
	}
	// /tmp is world-writable but sticky: what root makes in it is root's.
	if err := Check(dir); err != nil {
		t.Errorf("a root directory below sticky /tmp: %v", err)
	}
}
