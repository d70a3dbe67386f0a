package procdir

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A directory outlives its process only until the next Open: a child that
// made one and died leaves it to be swept, a live one keeps it.
func TestSweep(t *testing.T) {
	if os.Getenv("PROCDIR_CHILD") != "" {
		d, err := Open(os.Getenv("PROCDIR_CHILD"), nil)
		if err != nil {
			os.Exit(2)
		}
		os.WriteFile(filepath.Join(d.Path(), "state"), nil, 0o600)
		os.Stdout.WriteString(d.Path() + "\n" + d.Owner() + "\n")
		if os.Getenv("PROCDIR_WAIT") != "" {
			os.Stdin.Read(make([]byte, 1)) // until the parent closes stdin
		}
		os.Exit(0)
	}
	parent := t.TempDir()
	child := func(wait bool) (*exec.Cmd, string, string) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSweep$")
		cmd.Env = append(os.Environ(), "PROCDIR_CHILD="+parent)
		if wait {
			cmd.Env = append(cmd.Env, "PROCDIR_WAIT=1")
		}
		stdin, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		n, _ := out.Read(buf)
		lines := strings.Fields(string(buf[:n]))
		if len(lines) != 2 {
			t.Fatalf("child printed %q", buf[:n])
		}
		t.Cleanup(func() { stdin.Close(); cmd.Wait() })
		if !wait {
			cmd.Wait()
		}
		return cmd, lines[0], lines[1]
	}
	// The live one first: each Open sweeps, and the exited one's would go
	// with the next child's.
	_, live, liveOwner := child(true)
	_, gone, goneOwner := child(false)
	if Alive(goneOwner) || !Alive(liveOwner) {
		t.Errorf("alive: exited child %v, running child %v", Alive(goneOwner), Alive(liveOwner))
	}
	var cleaned []string
	d, err := Open(parent, func(dir string) error {
		cleaned = append(cleaned, dir)
		return os.RemoveAll(dir)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(cleaned) != 1 || cleaned[0] != gone {
		t.Errorf("cleaned %v, want only %s", cleaned, gone)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("the live child's directory: %v", err)
	}
	if again, _ := Open(parent, nil); again != d {
		t.Error("a second Open made another directory")
	}
	if !Alive(d.Owner()) {
		t.Error("this process's own directory is not alive")
	}
	if Alive(filepath.Join(parent, "nothing", lockName)) {
		t.Error("a lock file that does not exist is alive")
	}
}
