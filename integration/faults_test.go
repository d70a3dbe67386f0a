package integration

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// The daemon killed while it streams a large layer to a client (ctr here,
// CRI on a node): the pull fails, a restarted daemon serves the next one,
// and nothing is left behind.
func TestFaultDaemonKilledMidStream(t *testing.T) {
	e := newNixEnv(t, withPkgs(bigPackagesT(t, 512)))
	const ref = "nix.local/shell/big:latest"
	// Build first, so that what is killed is the streaming.
	if out, err := exec.Command("nix-build", append([]string{"--no-out-link", "-A", "big", e.pkgs}, nixOptionArgs()...)...).CombinedOutput(); err != nil {
		t.Fatalf("nix-build: %v\n%s", err, out)
	}
	hosts := e.hostsDir()
	pull := func() ([]byte, error) {
		args := []string{"--namespace", "default", "images", "pull", "--hosts-dir", hosts, "--snapshotter", "overlayfs"}
		if testutil.ContainerdBinDir() != "" {
			args = append(args, "--local")
		}
		return e.ctd.Ctr(t.Context(), append(args, ref)...).CombinedOutput()
	}
	done := make(chan error, 1)
	go func() {
		_, err := pull()
		done <- err
	}()
	// The layers are fetched after the config: kill the daemon once the
	// config was served and layer bytes flow.
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(e.daemon.log(), "/blobs/sha256:") || e.metric(t, "nixery_inflight_requests") == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no layer was requested")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.daemon.stop(syscall.SIGKILL)
	if err := <-done; err == nil {
		t.Fatal("the pull succeeded although the daemon was killed under it")
	}
	if imgs := e.images(); len(imgs) != 0 {
		t.Errorf("images after the failed pull: %v", imgs)
	}
	e.daemon.start(e.config)
	if out, err := pull(); err != nil {
		t.Fatalf("pull after the restart: %v\n%s", err, out)
	}
	// The failed pull's lease and ingests went with it.
	e.bigRunsAlone(ref)
	statuses, _ := e.ctd.Client.ContentStore().ListStatuses(e.ctx())
	if len(statuses) != 0 {
		t.Errorf("ingests left: %v", statuses)
	}
}

// The daemon killed while it builds for the CLI: pull fails saying so,
// nothing is registered, and once the daemon is back the next pull works
// and nothing of the killed one is left (its lease goes with the next).
func TestFaultDaemonKilledBuildingForCLI(t *testing.T) {
	e := newNixEnv(t, withPkgs(bigPackagesT(t, 256)))
	const ref = "nix.local/shell/big"
	if out, err := exec.Command("nix-build", append([]string{"--no-out-link", "-A", "big", e.pkgs}, nixOptionArgs()...)...).CombinedOutput(); err != nil {
		t.Fatalf("nix-build: %v\n%s", err, out)
	}
	cmd := exec.Command(binary, "pull", "--config", e.config, ref)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Once the daemon has unpacked a layer for it, the big one is next.
	var shown strings.Builder
	lines := bufio.NewScanner(stderr)
	for lines.Scan() {
		fmt.Fprintln(&shown, lines.Text())
		if strings.Contains(lines.Text(), "layer 1/") {
			break
		}
	}
	if !strings.Contains(shown.String(), "building in the daemon") {
		t.Fatalf("the CLI did not build in the daemon:\n%s", shown.String())
	}
	e.daemon.stop(syscall.SIGKILL)
	rest, _ := io.ReadAll(stderr)
	shown.Write(rest)
	if err := cmd.Wait(); err == nil {
		t.Fatalf("pull succeeded although the daemon was killed under it:\n%s", shown.String())
	}
	if !strings.Contains(shown.String(), "stopped answering while it built "+ref) {
		t.Errorf("pull does not say the daemon went away:\n%s", shown.String())
	}
	if imgs := e.images(); len(imgs) != 0 {
		t.Errorf("images after the failed pull: %v", imgs)
	}
	e.daemon.start(e.config)
	e.mustPull(ref)
	e.bigRunsAlone(ref)
}

// bigRunsAlone checks that the image ref of the big package runs, and
// that no lease is left of a pull that failed before.
func (e *env) bigRunsAlone(ref string) {
	e.t.Helper()
	if out := e.runOn("overlayfs", ref, "big"); out != "big\n" {
		e.t.Errorf("big printed %q", out)
	}
	ls, err := e.ctd.Client.LeasesService().List(e.ctx())
	if err != nil {
		e.t.Fatal(err)
	}
	if len(ls) != 0 {
		e.t.Errorf("leases left: %v", ls)
	}
}

// A content store that runs out of space: a clear error, nothing
// registered, the space taken given back at once (a smaller pull fits in
// the same disk), and a pull after space is added succeeds.
func TestFaultNoSpace(t *testing.T) {
	testutil.RequireNix(t)
	ctd := testutil.StartContainerd(t, testutil.WithTmpfsRoot("48m"))
	e := &env{t: t, ctd: ctd, pkgs: bigPackagesT(t, 64)}
	e.writeConfig(e.pkgs)
	_, stderr, err := e.pull("--snapshotter", "overlayfs", "nix.local/shell/big")
	if err == nil {
		t.Fatal("a 64 MiB image fit in 48 MiB")
	}
	if !strings.Contains(stderr, "no space left on device") {
		t.Errorf("stderr does not say the disk is full:\n%s", stderr)
	}
	if imgs := e.images(); len(imgs) != 0 {
		t.Errorf("images after running out of space: %v", imgs)
	}
	// Layers are unpacked straight into snapshots: those that fit were
	// committed, and are collected with the failed pull's lease.
	if sns := e.snapshots("overlayfs"); len(sns) != 0 {
		t.Errorf("snapshots after running out of space: %v", sns)
	}
	if got := e.content(); len(got) != 0 {
		t.Errorf("content after running out of space: %v", got)
	}
	// The space is free again: the partial snapshot went with the pull.
	if used := diskBytes(filepath.Join(ctd.Dir, "root", "io.containerd.snapshotter.v1.overlayfs")); used > 1<<20 {
		t.Errorf("%d KiB left in snapshots after the failed pull", used>>10)
		out, _ := exec.Command("sh", "-c", "cd "+filepath.Join(ctd.Dir, "root", "io.containerd.snapshotter.v1.overlayfs")+" && find . -maxdepth 3 | head -30; du -sh *").CombinedOutput()
		t.Logf("%s\n%s\nstderr:%s", out, ctd.Log(), stderr)
	}
	e.mustPull("--snapshotter", "overlayfs", "nix.local/htop")
	if out := e.run("nix.local/htop", "htop", "--version"); !strings.Contains(out, "htop") {
		t.Errorf("htop --version printed %q", out)
	}
	if err := syscall.Mount("tmpfs", filepath.Join(ctd.Dir, "root"), "tmpfs", syscall.MS_REMOUNT, "size=512m"); err != nil {
		t.Fatal(err)
	}
	e.mustPull("--snapshotter", "overlayfs", "nix.local/shell/big")
	if out := e.run("nix.local/shell/big", "big"); out != "big\n" {
		t.Errorf("big printed %q", out)
	}
}

// `nix-store --gc` running all along provisioning breaks nothing: pulls
// that build here, pulls that build in the daemon (unpacking layers, or
// writing blobs), pulls over the daemon's endpoint.
func TestFaultConcurrentGC(t *testing.T) {
	local, e := newEnv(t), newNixEnv(t)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// Stopped however the test ends: a collector left running would
	// delete the store paths of the tests after this one.
	stopGC := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopGC)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			exec.Command("nix-store", "--gc").Run()
		}
	}()
	for _, ref := range []string{"nix.local/htop", "nix.local/git", "nix.local/shell/jq", "nix.local/shell/htop", "nix.local/nano/git"} {
		local.mustPull(ref)
		e.mustPull("--namespace", "cli", ref)
		e.mustPull("--namespace", "blobs", "--with-layers", ref)
		e.ctrPull("overlayfs", ref+":latest")
	}
	stopGC()
	for _, e := range []*env{local, e} {
		if out := e.run("nix.local/shell/htop:latest", "htop", "--version"); !strings.Contains(out, htopVersion()) {
			t.Errorf("htop --version printed %q", out)
		}
	}
}

// A package set whose evaluation never ends is stopped by the timeout, and
// the error says so.
func TestFaultEvaluationTimeout(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "never")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Reading a FIFO nobody writes blocks evaluation forever.
	src := `{ system ? builtins.currentSystem, ... }:
import ` + testutil.TestPkgs() + ` { inherit system; } // { forever = import ` + fifo + `; }`
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	e.extraNix = map[string]any{"timeout": "3s"}
	e.writeConfig(dir)
	start := time.Now()
	_, stderr, err := e.pull("nix.local/forever")
	if err == nil {
		t.Fatal("evaluating forever succeeded")
	}
	if !strings.Contains(stderr, "timeout of 3s") {
		t.Errorf("stderr does not name the timeout:\n%s", stderr)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("the timeout took %s", d)
	}
}

func nixOptionArgs() []string {
	var args []string
	for k, v := range testutil.NixOptions() {
		args = append(args, "--option", k, v)
	}
	return args
}

// A pull killed (SIGKILL) while it unpacks a layer leaves a lease, an
// active snapshot and its per-process directories; the next pull, of
// anything, deletes them all, and nothing stays mounted.
func TestFaultPullKilledMidUnpack(t *testing.T) {
	testutil.RequireNix(t)
	e := &env{t: t, ctd: testutil.StartContainerd(t), pkgs: bigPackagesT(t, 256)}
	e.writeConfig(e.pkgs)
	e.mustNixBuild("big")
	for _, snapshotter := range []string{"overlayfs", "native"} {
		cmd := exec.Command(binary, "pull", "--config", e.config, "--snapshotter", snapshotter, "nix.local/big")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pid := cmd.Process.Pid
		deadline := time.Now().Add(60 * time.Second)
		for !slices.ContainsFunc(e.activeSnapshots(snapshotter), func(k string) bool { return strings.Contains(k, "nixery-layer-") }) {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("%s: no layer was being unpacked", snapshotter)
			}
			time.Sleep(5 * time.Millisecond)
		}
		cmd.Process.Kill()
		cmd.Wait()
		ls, _ := e.ctd.Client.LeasesService().List(e.ctx())
		if len(ls) == 0 {
			t.Fatalf("%s: the killed pull left no lease: the test saw nothing", snapshotter)
		}

		e.mustPull("--snapshotter", snapshotter, "nix.local/htop")
		if ls, _ := e.ctd.Client.LeasesService().List(e.ctx()); len(ls) != 0 {
			t.Errorf("%s: leases after the next pull: %v", snapshotter, ls)
		}
		if active := e.activeSnapshots(snapshotter); len(active) != 0 {
			t.Errorf("%s: active snapshots after the next pull: %v", snapshotter, active)
		}
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		for _, line := range strings.Split(string(mounts), "\n") {
			if strings.Contains(line, filepath.Join(e.root, "work")) || strings.Contains(line, "containerd-mount") {
				t.Errorf("%s: mounted after the next pull: %s", snapshotter, line)
			}
		}
		for _, pattern := range []string{
			filepath.Join(e.root, "work", fmt.Sprintf("%d-*", pid)),
			filepath.Join(e.root, "work", "mounts", fmt.Sprintf("%d-*", pid)),
			fmt.Sprintf("/nix/var/nix/gcroots/nixery-builds/%d-*", pid),
		} {
			if left, _ := filepath.Glob(pattern); len(left) != 0 {
				t.Errorf("%s: the killed pull's directories are left: %v", snapshotter, left)
			}
		}
		if out := e.runOn(snapshotter, "nix.local/htop", "htop", "--version"); !strings.Contains(out, "htop") {
			t.Errorf("%s: htop --version printed %q", snapshotter, out)
		}
	}
}
