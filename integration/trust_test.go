package integration

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
)

// markerLayer is a layer holding one file, /marker, that says "blob".
func markerLayer(t *testing.T, annotations map[string]string) archiveLayer {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "marker", Mode: 0o644, Size: 5, Typeflag: tar.TypeReg})
	tw.Write([]byte("blob\n"))
	tw.Close()
	return archiveLayer{data: b.Bytes(), annotations: annotations}
}

// importImage imports an OCI archive and unpacks it into the nix snapshotter.
func (e *env) importImage(archive string) ([]byte, error) {
	return e.ctd.Ctr(e.t.Context(), "--namespace", "default", "images", "import", "--snapshotter", "nix", archive).CombinedOutput()
}

// An image from anywhere can carry the labels by which this node's layers
// name their store paths. Labels that are not store paths fail the pull
// and touch nothing; store paths this node did not build are not linked
// from the store: the layer's blob is unpacked instead, as any image's.
func TestHostileImageLabels(t *testing.T) {
	bin, calls := countingNix(t)
	e := newNixEnv(t, func(e *env) { e.daemon.nixBin = bin })
	htop := strings.TrimSpace(e.mustNixBuild("htop"))
	outside := t.TempDir()
	shadowLinks := testutil.Nlink(t, "/etc/shadow")
	base := bashLayers(t)

	for i, attack := range []struct{ name, label, value string }{
		{"host file", labels.StorePathsLabel + ".0", "/etc/shadow"},
		{"traversal", labels.StorePathsLabel + ".0", "/nix/store/../../../.." + outside + "/escape"},
		{"traversal below a store path", labels.StorePathsLabel + ".0", htop + "/../../../.." + outside + "/escape"},
		{"Nix option", labels.StorePathsLabel + ".0", "--option plugin-files /proc/self/cwd/../tmp/x/evil.so " + htop},
		{"newline", labels.StorePathsLabel + ".0", htop + "\n/etc/shadow"},
		{"NUL", labels.StorePathsLabel + ".0", htop + "\x00/etc/shadow"},
		{"symlink forest of a host directory", labels.SymlinksLabel + ".0", "/etc"},
	} {
		name := fmt.Sprintf("example.org/hostile:%d", i)
		archive := ociArchive(t, name, append(base, markerLayer(t, map[string]string{attack.label: attack.value})))
		out, err := e.importImage(archive)
		if err == nil {
			t.Errorf("%s: the image was unpacked:\n%s", attack.name, out)
			continue
		}
		// containerd itself may refuse a NUL in a label before we see it.
		if !strings.Contains(string(out), "not Nix store paths") && !(attack.name == "NUL" && strings.Contains(string(out), "invalid")) {
			t.Errorf("%s: the error does not say what is wrong:\n%s", attack.name, out)
		}
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("files made outside the snapshotter: %v", entries)
	}
	if n := testutil.Nlink(t, "/etc/shadow"); n != shadowLinks {
		t.Errorf("/etc/shadow has %d links, had %d", n, shadowLinks)
	}
	if log, _ := os.ReadFile(calls); strings.Contains(string(log), "plugin-files") || strings.Contains(string(log), "/etc/shadow") {
		t.Errorf("Nix was handed the attack:\n%s", log)
	}

	// A real store path, in an image this node did not build: the blob.
	archive := ociArchive(t, "example.org/foreign:1", append(base, markerLayer(t, labels.StorePathAnnotations([]string{htop}))))
	if out, err := e.importImage(archive); err != nil {
		t.Fatalf("importing a foreign image: %v\n%s", err, out)
	}
	got := e.runOn("nix", "example.org/foreign:1", "bash", "-c", "read -r m < /marker; echo $m; test -e "+htop+" && echo linked || echo not linked")
	if got != "blob\nnot linked\n" {
		t.Errorf("foreign image's container sees %q", got)
	}
	if n := e.metric(t, "nixery_snapshot_untrusted_layers_total"); n < 1 {
		t.Errorf("untrusted layers counted: %v", n)
	}

	// The labels of a layer this node built, copied exactly into another
	// image (to commit those store paths as a layer of another chain):
	// the blob, still.
	e.mustPull("--snapshotter", "nix", "nix.local/htop")
	m, _ := e.manifest(t, "nix.local/htop:latest")
	var copied map[string]string
	for _, l := range m.Layers {
		if slices.Contains(storePaths(l.Annotations), htop) {
			copied = l.Annotations
		}
	}
	if copied == nil {
		t.Fatalf("no layer of nix.local/htop holds %s", htop)
	}
	archive = ociArchive(t, "example.org/copied:1", append(base, markerLayer(t, copied)))
	if out, err := e.importImage(archive); err != nil {
		t.Fatalf("importing an image with copied labels: %v\n%s", err, out)
	}
	got = e.runOn("nix", "example.org/copied:1", "bash", "-c", "read -r m < /marker; echo $m; test -e "+htop+" && echo linked || echo not linked")
	if got != "blob\nnot linked\n" {
		t.Errorf("copied labels: the container sees %q", got)
	}
}

// On a node that trusts other images' store-path layers, they are still
// only valid store paths of this store: a store path that is a symlink out
// of the store is that symlink inside the container, not the host's file.
func TestTrustedImageSymlinkOutOfStore(t *testing.T) {
	e := newNixEnv(t, func(e *env) { e.daemon.trustOthers = true })
	dir := t.TempDir()
	link := filepath.Join(dir, "shadow-link")
	if err := os.Symlink("/etc/shadow", link); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("nix-store", "--add", link).Output()
	if err != nil {
		t.Fatal(err)
	}
	stored := strings.TrimSpace(string(out))
	shadowLinks := testutil.Nlink(t, "/etc/shadow")
	archive := ociArchive(t, "example.org/symlink:1", append(bashLayers(t), markerLayer(t, labels.StorePathAnnotations([]string{stored}))))
	if out, err := e.importImage(archive); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	got := e.runOn("nix", "example.org/symlink:1", "bash", "-c", "test -L "+stored+" && echo symlink; read -r l < "+stored+" 2>/dev/null || echo unreadable")
	if got != "symlink\nunreadable\n" {
		t.Errorf("container sees %q", got)
	}
	if n := testutil.Nlink(t, "/etc/shadow"); n != shadowLinks {
		t.Errorf("/etc/shadow has %d links, had %d", n, shadowLinks)
	}
}

// squatter listens where the daemon would and counts who comes; it
// answers nothing a client could use.
type squatter struct {
	net.Listener
	conns atomic.Int64
}

func newSquatter(t *testing.T, network, address string) *squatter {
	t.Helper()
	l, err := net.Listen(network, address)
	if err != nil {
		t.Fatal(err)
	}
	s := &squatter{Listener: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return s
}

// The CLI has only root's daemon build for it: it never asks whatever
// listens on the endpoint's TCP port (any user can, while the daemon is
// down), nor a socket someone other than root made, and builds by itself
// when what answers on root's socket is not the daemon's API.
func TestCLIUntrustedDaemon(t *testing.T) {
	e := newEnv(t)
	e.writeConfig(testutil.TestPkgs())
	config := func(section string, values map[string]any) {
		cfg := e.readConfig()
		cfg[section] = values
		e.writeTOML(cfg)
	}

	// A squatter on the TCP port, the daemon down: the CLI builds here.
	tcp := newSquatter(t, "tcp", "127.0.0.1:0")
	config("registry", map[string]any{"address": tcp.Addr().String()})
	config("api", map[string]any{"socket": filepath.Join(t.TempDir(), "none.sock")})
	e.mustPull("nix.local/htop")
	if n := tcp.conns.Load(); n != 0 {
		t.Errorf("the CLI asked the squatter on the TCP port %d times", n)
	}

	// A socket another user made: refused, said so, built here.
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	socket := filepath.Join(dir, "api.sock")
	unix := newSquatter(t, "unix", socket)
	os.Chmod(socket, 0o666)
	if err := os.Chown(socket, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	config("api", map[string]any{"socket": socket})
	_, stderr, err := e.pull("--log-level", "warn", "nix.local/htop")
	if err != nil {
		t.Fatalf("pull with a socket of another user's: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr, "belongs to uid 65534") {
		t.Errorf("the CLI does not say why it did not build in the daemon:\n%s", stderr)
	}
	if n := unix.conns.Load(); n != 0 {
		t.Errorf("the CLI asked a socket of uid 65534 %d times", n)
	}

	// Root's socket, answering something that is not the daemon's API.
	os.Chown(socket, 0, 0)
	if _, stderr, err := e.pull("nix.local/htop"); err != nil || strings.Contains(stderr, "building in the daemon") {
		t.Errorf("pull with root's socket that is not the API: %v\n%s", err, stderr)
	}
	if n := unix.conns.Load(); n == 0 {
		t.Error("the CLI did not ask root's socket")
	}
}

// Beyond loopback the endpoint serves only with TLS and client
// certificates, and refuses to start otherwise; on loopback TLS with
// client certificates is what containerd can use (hosts.toml ca, client)
// so that a user who squats the port cannot serve kubelet an image.
func TestRegistryTLS(t *testing.T) {
	testutil.RequireNix(t)
	files := testutil.WriteTLS(t, t.TempDir())
	for _, tc := range []struct {
		name     string
		registry map[string]any
	}{
		{"all interfaces", map[string]any{"address": "0.0.0.0:0"}},
		{"no address", map[string]any{"address": ":0"}},
		{"TLS without client certificates", map[string]any{"address": "0.0.0.0:0", "tls_cert": files.ServerCert, "tls_key": files.ServerKey}},
	} {
		d := newDaemon(t)
		cfg := map[string]any{
			"nix":         map[string]any{"pkgs_path": testutil.TestPkgs()},
			"snapshotter": map[string]any{"address": d.address, "root": d.root},
			"registry":    tc.registry,
			"metrics":     map[string]any{"address": ""},
		}
		e := &env{t: t}
		e.writeTOML(cfg)
		out, err := exec.Command(binary, "serve", "--config", e.config).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "not a loopback address") || !strings.Contains(string(out), "client_ca") {
			t.Errorf("%s: serve %v:\n%s", tc.name, err, out)
		}
	}

	e := newNixEnv(t, func(e *env) { e.daemon.tls = &files })
	url := "https://" + e.daemon.http + "/v2/"
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(files.CA)
	pool.AppendCertsFromPEM(ca)
	anonymous := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	if resp, err := anonymous.Get(url); err == nil {
		resp.Body.Close()
		t.Errorf("a client without a certificate got %s", resp.Status)
	}
	cert, err := tls.LoadX509KeyPair(files.ClientCert, files.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	resp, err := client.Get(url)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("a client with a certificate: %v", err)
	}
	resp.Body.Close()

	// containerd, as hosts.toml tells it.
	hosts := filepath.Join(t.TempDir(), "certs.d")
	os.MkdirAll(filepath.Join(hosts, "nix.local"), 0o755)
	toml := fmt.Sprintf("server = %q\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = %q\n  client = [[%q, %q]]\n",
		"https://"+e.daemon.http, "https://"+e.daemon.http, files.CA, files.ClientCert, files.ClientKey)
	if err := os.WriteFile(filepath.Join(hosts, "nix.local", "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"--namespace", "default", "images", "pull", "--hosts-dir", hosts, "--snapshotter", "overlayfs"}
	if testutil.ContainerdBinDir() != "" {
		args = append(args, "--local")
	}
	if out, err := e.ctd.Ctr(t.Context(), append(args, "nix.local/htop:latest")...).CombinedOutput(); err != nil {
		t.Fatalf("ctr pull over TLS: %v\n%s", err, out)
	}
	if out := e.runOn("overlayfs", "nix.local/htop:latest", "htop", "--version"); !strings.Contains(out, "htop") {
		t.Errorf("htop --version printed %q", out)
	}
}

// procIO reads a counter of /proc/PID/io.
func procIO(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+": "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/io", field, pid)
	return 0
}

// openFDs counts the open files of process pid.
func openFDs(t *testing.T, pid int) int {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// children lists the commands of pid's child processes.
func children(pid int) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(stat)
		end := strings.LastIndexByte(s, ')')
		if end < 0 {
			continue
		}
		fields := strings.Fields(s[end+1:])
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			out = append(out, s[strings.IndexByte(s, '(')+1:end])
		}
	}
	return out
}

// holdDirs counts the directories of GC roots the daemon holds now.
func holdDirs(t *testing.T, pid int) int {
	dirs, _ := filepath.Glob(fmt.Sprintf("/nix/var/nix/gcroots/nixery-builds/%d-*/roots-*", pid))
	return len(dirs)
}

// The endpoint bounds what local clients can take: idle and silent
// connections are shed, readers of one image share one hold of its store
// paths (and one Nix process at most), and a range does not re-read what
// comes before it.
func TestRegistryLimits(t *testing.T) {
	e := newNixEnv(t, withPkgs(bigPackagesT(t, 128)))
	pid := e.daemon.cmd.Process.Pid
	base := "http://" + e.daemon.http
	resp, err := http.Get(base + "/v2/big/manifests/latest")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("manifest: %v %v", resp, err)
	}
	var m ocispec.Manifest
	json.NewDecoder(resp.Body).Decode(&m)
	resp.Body.Close()
	big := m.Layers[0]
	for _, l := range m.Layers {
		if l.Size > big.Size {
			big = l
		}
	}
	blob := base + "/v2/big/blobs/" + big.Digest.String()

	// 64 one-byte ranges at the end of the largest layer.
	before := procIO(t, pid, "rchar")
	for range 64 {
		req, _ := http.NewRequest(http.MethodGet, blob, nil)
		req.Header.Set("Range", "bytes=-1")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusPartialContent || len(b) != 1 {
			t.Fatalf("range: %s, %d bytes", resp.Status, len(b))
		}
	}
	if read := procIO(t, pid, "rchar") - before; read > big.Size/4 {
		t.Errorf("64 one-byte ranges of a %d-byte layer read %d bytes", big.Size, read)
	}

	// 20 readers that never read: one hold between them.
	heldBefore := holdDirs(t, pid)
	var stalled []net.Conn
	for range 20 {
		c, err := net.Dial("tcp", e.daemon.http)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET /v2/big/blobs/%s HTTP/1.1\r\nHost: x\r\n\r\n", big.Digest)
		stalled = append(stalled, c)
	}
	deadline := time.Now().Add(30 * time.Second)
	for e.metric(t, "nixery_inflight_requests") < 20 {
		if time.Now().After(deadline) {
			t.Fatalf("%v requests in flight", e.metric(t, "nixery_inflight_requests"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := holdDirs(t, pid) - heldBefore; n > 1 {
		t.Errorf("20 readers of one image hold %d sets of roots", n)
	}
	nixProcs := 0
	for _, c := range children(pid) {
		if strings.HasPrefix(c, "nix") {
			nixProcs++
		}
	}
	if nixProcs > 5 {
		t.Errorf("%d Nix processes for 20 readers: %v", nixProcs, children(pid))
	}
	for _, c := range stalled {
		c.Close()
	}

	// 1,000 connections that say nothing, then 1,000 kept alive idle.
	fdsBefore := openFDs(t, pid)
	var conns []net.Conn
	for i := range 2000 {
		c, err := net.Dial("tcp", e.daemon.http)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
		if i >= 1000 {
			fmt.Fprint(c, "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			bufio.NewReader(c).ReadString('\n')
		}
	}
	if n := openFDs(t, pid); n > fdsBefore+2*64 {
		t.Errorf("the daemon has %d files open with 2,000 idle connections (%d before)", n, fdsBefore)
	}
	if rss := e.daemon.rss(); rss > 128<<20 {
		t.Errorf("the daemon's resident set is %d MiB", rss>>20)
	}
	shed := 0
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
			shed++
		}
		c.Close()
	}
	if shed < 2000-2*64 {
		t.Errorf("%d of 2,000 idle connections shed", shed)
	}
	start := time.Now()
	resp, err = http.Get(base + "/v2/")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("after the flood: %v %v", resp, err)
	}
	resp.Body.Close()
	t.Logf("shed %d of 2,000 connections; /v2/ answered in %s after", shed, time.Since(start))
}
