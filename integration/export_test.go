package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// cli runs a command of the binary with the env's configuration and
// returns its stdout.
func (e *env) cli(command string, args ...string) string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append([]string{command, "--config", e.config}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		e.t.Fatalf("%s %v: %v\n%s", command, args, err, stderr.String())
	}
	return string(out)
}

// skopeo runs skopeo and returns its stdout.
func skopeo(t *testing.T, args ...string) []byte {
	t.Helper()
	out, err := exec.Command("skopeo", args...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("skopeo %v: %v\n%s", args, err, stderr)
	}
	return out
}

// An exported archive holds the image the endpoint serves (one manifest
// digest), which ctr imports and runs and skopeo reads.
func TestExport(t *testing.T) {
	e := newNixEnv(t)
	const ref = "nix.local/shell/htop"
	want, _ := e.fetchManifest(t, "shell/htop", "latest")

	file := filepath.Join(t.TempDir(), "htop.tar")
	e.cli("export", ref, file)
	if raw := skopeo(t, "inspect", "--raw", "oci-archive:"+file); digest.FromBytes(raw) != want {
		t.Errorf("skopeo reads manifest %s from the archive, the endpoint serves %s", digest.FromBytes(raw), want)
	}
	// skopeo copies it whole, checking every blob's digest.
	skopeo(t, "copy", "oci-archive:"+file, "oci:"+filepath.Join(t.TempDir(), "layout")+":x")

	if out, err := e.ctd.Ctr(t.Context(), "--namespace", "default", "images", "import", file).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
	if _, img := e.manifest(t, ref+":latest"); img.Target.Digest != want {
		t.Errorf("ctr imported %s, want %s", img.Target.Digest, want)
	}
	if out := e.runOn("overlayfs", ref+":latest", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}

	// A failed export leaves no file: before writing (a missing package)
	// and after (the file cannot be put in place: a directory is there).
	bad := filepath.Join(t.TempDir(), "bad.tar")
	if _, err := exec.Command(binary, "export", "--config", e.config, "nix.local/no-such-package", bad).Output(); err == nil {
		t.Error("export of a missing package succeeded")
	}
	if err := os.Mkdir(bad, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.Command(binary, "export", "--config", e.config, ref, bad).Output(); err == nil {
		t.Error("export onto a directory succeeded")
	}
	if entries, _ := os.ReadDir(filepath.Dir(bad)); len(entries) != 1 || entries[0].Name() != "bad.tar" || !entries[0].IsDir() {
		t.Errorf("failed exports left %v", entries)
	}
}

// startRegistry runs Debian's docker-registry (the CNCF distribution
// registry) on loopback with storage of its own, and returns its address.
func startRegistry(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		testutil.Skip(t, "needs docker-registry (Debian's package; hack/setup.sh installs it)")
	}
	dir := t.TempDir()
	addr := freePort(t)
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr)), 0o600); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfg)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logFile.Close() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logFile.Name())
			t.Fatalf("docker-registry did not start:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A pushed image is in a real registry with the digest the endpoint
// serves, and a client this project did not write reads it back whole.
func TestPush(t *testing.T) {
	e := newNixEnv(t)
	registry := startRegistry(t)
	want, _ := e.fetchManifest(t, "shell/htop", "latest")
	dest := registry + "/tools/htop:1.0"
	out := e.cli("push", "--plain-http", "nix.local/shell/htop", dest)
	if got := strings.Fields(out); len(got) != 2 || got[0] != dest || got[1] != want.String() {
		t.Errorf("push printed %q, want %s %s", out, dest, want)
	}
	if raw := skopeo(t, "inspect", "--tls-verify=false", "--raw", "docker://"+dest); digest.FromBytes(raw) != want {
		t.Errorf("the registry serves manifest %s, the endpoint %s", digest.FromBytes(raw), want)
	}
	skopeo(t, "copy", "--src-tls-verify=false", "docker://"+dest, "oci:"+filepath.Join(t.TempDir(), "layout")+":x")

	// Pushing again finds every blob there.
	e.cli("push", "--plain-http", "nix.local/shell/htop", dest)
}
