package integration

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// daemon is `nixery-snapshotter serve` run as a child process.
type daemon struct {
	t       testing.TB
	dir     string
	address string
	http    string // the distribution endpoint's host:port
	socket  string // its API's unix socket, the CLI's way in
	metrics string // host:port of /metrics and /healthz
	root    string
	gcRoots string
	nixBin  string // Nix commands the daemon runs, when not PATH's
	// trustOthers is snapshotter.trust_other_images.
	trustOthers bool
	// tls, when set, makes the endpoint HTTPS with client certificates.
	tls *testutil.TLSFiles
	// earlyHeaders is the endpoint's registry.early_headers, when set.
	earlyHeaders string
	// unpackInto is the endpoint's registry.unpack_into, when set.
	unpackInto []string
	// nixDir, when set, is the /nix of a node of its own: the daemon and
	// the CLI run in a mount namespace where it is mounted on /nix.
	nixDir string
	config string
	cmd    *exec.Cmd
	exited chan struct{}
}

func newDaemon(t testing.TB) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "nixery-daemon-")
	if err != nil {
		t.Fatal(err)
	}
	// GC roots only count below Nix's gcroots directory (which a fresh
	// Nix may not have made yet).
	if err := os.MkdirAll("/nix/var/nix/gcroots", 0o755); err != nil {
		t.Fatal(err)
	}
	gcRoots, err := os.MkdirTemp("/nix/var/nix/gcroots", "nixery-test-")
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{
		t:       t,
		dir:     dir,
		http:    freePort(t),
		metrics: freePort(t),
		address: filepath.Join(dir, "run", "nix.sock"),
		socket:  filepath.Join(dir, "run", "api.sock"),
		root:    filepath.Join(dir, "root"),
		gcRoots: gcRoots,
	}
	t.Cleanup(func() {
		d.stop()
		// Snapshots hold no mounts of their own; containerd's cleanup
		// (registered later, run earlier) has unmounted containers.
		os.RemoveAll(d.dir)
		os.RemoveAll(d.gcRoots)
	})
	return d
}

// start runs the daemon with config and waits for its socket.
func (d *daemon) start(config string) {
	d.t.Helper()
	d.config = config
	log, err := os.OpenFile(filepath.Join(d.dir, "daemon.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		d.t.Fatal(err)
	}
	defer log.Close()
	d.cmd = d.command(binary, "serve", "--config", config, "--log-level", "debug")
	d.cmd.Stdout, d.cmd.Stderr = log, log
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) { cmd.Wait(); close(exited) }(d.cmd, d.exited)
	deadline := time.Now().Add(20 * time.Second)
	for {
		// All answer: a killed daemon leaves its socket files behind, so
		// that a file exists says nothing.
		if d.answers("unix", d.address) && d.answers("tcp", d.http) && d.answers("unix", d.socket) {
			return
		}
		select {
		case <-d.exited:
			d.t.Fatalf("daemon exited; log:\n%s", d.log())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("daemon did not start; log:\n%s", d.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// command runs name where the daemon's Nix is: in its node's mount
// namespace, if it has one (the process keeps its pid through unshare
// and sh: signals reach it).
func (d *daemon) command(name string, args ...string) *exec.Cmd {
	if d.nixDir == "" {
		return exec.Command(name, args...)
	}
	return exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "sh", "-c",
		`mount --bind "$1" /nix && shift && exec "$@"`, "sh", d.nixDir, name}, args...)...)
}

// withOwnNix gives the env's daemon (and CLI) a /nix of its own, empty,
// as a new node has: a fleet on one machine.
func withOwnNix() envOpt {
	return func(e *env) {
		d := e.daemon
		d.nixDir = filepath.Join(d.dir, "nix")
		os.MkdirAll("/nix", 0o755) // to mount on
		if err := os.MkdirAll(d.nixDir, 0o755); err != nil {
			e.t.Fatal(err)
		}
		// The node's Nix makes the directory, in its own store.
		os.Remove(d.gcRoots)
		d.gcRoots = "/nix/var/nix/gcroots/nixery-node"
	}
}

// answers reports whether something accepts connections at address.
func (d *daemon) answers(network, address string) bool {
	c, err := net.Dial(network, address)
	if err == nil {
		c.Close()
	}
	return err == nil
}

func (d *daemon) log() string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "daemon.log"))
	return string(b)
}

// stop ends the daemon with sig (SIGTERM unless given).
func (d *daemon) stop(sig ...syscall.Signal) {
	if d.exited == nil {
		return
	}
	s := syscall.SIGTERM
	if len(sig) > 0 {
		s = sig[0]
	}
	_ = d.cmd.Process.Signal(s)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	d.exited = nil
}

// freePort returns a loopback address no one listens on.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// peakRSS is the largest resident set the daemon has had, in bytes.
func (d *daemon) peakRSS() int64 { return d.status("VmHWM:") }

// rss is the daemon's resident set now, in bytes.
func (d *daemon) rss() int64 { return d.status("VmRSS:") }

func (d *daemon) status(field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			kib, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kib << 10
		}
	}
	return 0
}
