package testutil

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
)

// Containerd is a containerd daemon run as a child process of a test, with
// its own root, state and sockets.
type Containerd struct {
	Dir     string // holds config, root, state and sockets
	Address string // gRPC socket
	Client  *containerd.Client
	cmd     *exec.Cmd
	v17     bool
	exited  chan struct{}
	cfgPath string
	logPath string
}

type containerdConfig struct {
	extra     strings.Builder
	cri       bool
	tmpfsRoot string
}

// ContainerdOpt adjusts the daemon's configuration.
type ContainerdOpt func(*containerdConfig)

// WithConfig appends TOML to containerd's configuration.
func WithConfig(toml string) ContainerdOpt {
	return func(c *containerdConfig) { c.extra.WriteString(toml + "\n") }
}

// WithTmpfsRoot puts containerd's root (content store, snapshots) on a
// tmpfs of size (e.g. "32m"), to run it out of space.
func WithTmpfsRoot(size string) ContainerdOpt {
	return func(c *containerdConfig) { c.tmpfsRoot = size }
}

// WithCRI keeps containerd's CRI plugins (off otherwise: they want CNI).
func WithCRI() ContainerdOpt { return func(c *containerdConfig) { c.cri = true } }

// StartContainerd starts a containerd and stops it, its containers and
// their shims when t ends. It needs root, containerd and runc.
func StartContainerd(t testing.TB, opts ...ContainerdOpt) *Containerd {
	t.Helper()
	RequireRoot(t)
	RequireCommands(t, "containerd", "containerd-shim-runc-v2", "runc", "ctr")

	// Not t.TempDir: its removal would race the shims' mounts.
	dir, err := os.MkdirTemp("", "nixery-ctd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &Containerd{Dir: dir, Address: filepath.Join(dir, "containerd.sock"), logPath: filepath.Join(dir, "containerd.log")}
	var cc containerdConfig
	for _, opt := range opts {
		opt(&cc)
	}
	disabled := `"io.containerd.nri.v1.nri"`
	if !cc.cri {
		disabled += `, "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"`
	}
	// containerd 1.7 reads configuration version 2; the tables used here
	// are the same in both.
	version := 3
	if c.v17 = ContainerdBinDir() != ""; c.v17 {
		version = 2
	}
	var cfg strings.Builder
	fmt.Fprintf(&cfg, `version = %d
root = %q
state = %q
disabled_plugins = [%s]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, version, filepath.Join(dir, "root"), filepath.Join(dir, "state"), disabled, c.Address, c.Address+".ttrpc")
	cfg.WriteString(cc.extra.String())
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	c.cfgPath = cfgPath
	t.Cleanup(func() { c.stop(t) })
	if cc.tmpfsRoot != "" {
		root := filepath.Join(dir, "root")
		if err := os.MkdirAll(root, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size="+cc.tmpfsRoot); err != nil {
			Skip(t, "cannot mount a tmpfs: "+err.Error())
		}
	}
	c.start(t)
	return c
}

func (c *Containerd) start(t testing.TB) {
	t.Helper()
	logFile, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	bin := "containerd"
	if dir := ContainerdBinDir(); dir != "" {
		bin = filepath.Join(dir, "containerd")
		// Its own shim, found through PATH.
		c.cmd = exec.Command(bin, "--config", c.cfgPath, "--log-level", "debug")
		c.cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"))
	} else {
		c.cmd = exec.Command(bin, "--config", c.cfgPath, "--log-level", "debug")
	}
	c.cmd.Stdout, c.cmd.Stderr = logFile, logFile
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logFile.Close()
	c.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) { cmd.Wait(); close(exited) }(c.cmd, c.exited)

	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(c.Address); err == nil {
			client, err := containerd.New(c.Address)
			if err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err = client.Version(ctx)
				cancel()
				if err == nil {
					c.Client = client
					return
				}
				client.Close()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not start; log:\n%s", c.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Restart stops containerd (its containers keep running under their
// shims) and starts it again on the same root and state.
func (c *Containerd) Restart(t testing.TB) {
	t.Helper()
	c.Client.Close()
	c.Client = nil
	c.terminate()
	c.start(t)
}

func (c *Containerd) terminate() {
	if c.exited == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(15 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
}

// Log is what containerd wrote so far.
func (c *Containerd) Log() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

// Ctr runs the ctr client against this containerd.
func (c *Containerd) Ctr(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ctr", append([]string{"--address", c.Address}, args...)...)
}

func (c *Containerd) stop(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if c.Client != nil {
		c.removeContainers(ctx)
		c.Client.Close()
	}
	c.terminate()
	killShims(c.Address)
	unmountBelow(c.Dir)
	if err := os.RemoveAll(c.Dir); err != nil {
		t.Logf("removing %s: %v", c.Dir, err)
	}
}

// removeContainers stops and deletes every container: runc shims outlive
// containerd, so they must be ended here.
func (c *Containerd) removeContainers(ctx context.Context) {
	nss, err := c.Client.NamespaceService().List(ctx)
	if err != nil {
		return
	}
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		containers, err := c.Client.Containers(nctx)
		if err != nil {
			continue
		}
		for _, ctr := range containers {
			if task, err := ctr.Task(nctx, nil); err == nil {
				_ = task.Kill(nctx, syscall.SIGKILL)
				if ch, err := task.Wait(nctx); err == nil {
					select {
					case <-ch:
					case <-time.After(5 * time.Second):
					}
				}
				_, _ = task.Delete(nctx)
			}
			_ = ctr.Delete(nctx, containerd.WithSnapshotCleanup)
		}
	}
}

// killShims ends shims started for the containerd at address.
func killShims(address string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || !strings.HasSuffix(args[0], "containerd-shim-runc-v2") {
			continue
		}
		for _, a := range args {
			if a == address {
				if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
	}
}

// unmountBelow unmounts every mount under dir, deepest first.
func unmountBelow(dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var mounts []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			mounts = append(mounts, fields[4])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		_ = syscall.Unmount(mounts[i], syscall.MNT_DETACH)
	}
}

// ContainerdBinDir is where another containerd (1.7) is installed for a
// compatibility run: $NIXERY_CONTAINERD_BIN_DIR, or "" for the one in PATH.
func ContainerdBinDir() string { return os.Getenv("NIXERY_CONTAINERD_BIN_DIR") }
