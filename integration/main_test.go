package integration

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/pelletier/go-toml/v2"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
)

// binary is the nixery-snapshotter built for this test run.
var binary string

// binaryEnv names the binary for test processes this one starts (a test
// run again in a mount namespace of its own): they use this run's, not one
// built from the source tree as it is by then.
const binaryEnv = "NIXERY_TEST_BINARY"

func TestMain(m *testing.M) {
	if binary = os.Getenv(binaryEnv); binary != "" {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "nixery-bin-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "nixery-snapshotter")
	build := exec.Command("go", "build", "-o", binary, "./cmd/nixery-snapshotter")
	build.Dir = testutil.RepoRoot()
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building nixery-snapshotter:", err)
		os.Exit(1)
	}
	os.Setenv(binaryEnv, binary)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one test's containerd plus the configuration the CLI uses with it.
type env struct {
	t      testing.TB
	ctd    *testutil.Containerd
	daemon *daemon // the nix snapshotter, if started
	config string
	pkgs   string // package set directory, when not the test set
	cri    bool   // containerd's CRI is on
	// criSnapshotter is the snapshotter CRI unpacks into: nix but where set.
	criSnapshotter string
	root           string // the CLI's state (cache) without a daemon
	// extraNix and extraImage are more [nix] and [image] settings.
	extraNix, extraImage map[string]any
	path                 string // PATH for the CLI; the default when empty
	// peakRSS is the largest resident set a CLI run had, in bytes.
	peakRSS int64
}

func newEnv(t testing.TB) *env {
	t.Helper()
	testutil.RequireNix(t)
	ctd := testutil.StartContainerd(t)
	e := &env{t: t, ctd: ctd}
	e.writeConfig(testutil.TestPkgs())
	return e
}

// envOpt adjusts an env before its daemon starts.
type envOpt func(*env)

// withPkgs uses the package set in dir.
func withPkgs(dir string) envOpt { return func(e *env) { e.pkgs = dir } }

// withCRI enables containerd's CRI with `nix` as its snapshotter, the
// daemon's endpoint as the nix.local mirror and nix.local/pause as the
// sandbox image.
func withCRI() envOpt { return func(e *env) { e.cri = true } }

// newNixEnv starts the nix snapshotter daemon and a containerd that knows
// it as the proxy plugin "nix".
func newNixEnv(t testing.TB, opts ...envOpt) *env {
	t.Helper()
	testutil.RequireNix(t)
	testutil.RequireRoot(t)
	e := &env{t: t, daemon: newDaemon(t), pkgs: testutil.TestPkgs()}
	for _, opt := range opts {
		opt(e)
	}
	ctdOpts := []testutil.ContainerdOpt{testutil.WithConfig(fmt.Sprintf(`[proxy_plugins.nix]
  type = "snapshot"
  address = %q
# The transfer service (ctr image pull/import, CRI) unpacks only into the
# snapshotters listed here.
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "nix"`, e.daemon.address))}
	if e.cri {
		cni := t.TempDir()
		snapshotter := cmp.Or(e.criSnapshotter, "nix")
		ctdOpts = append(ctdOpts, testutil.WithCRI(), testutil.WithConfig(fmt.Sprintf(`[plugins."io.containerd.cri.v1.images"]
  snapshotter = %q
  image_pull_progress_timeout = "30m"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %q
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "nix.local/pause:latest"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%q]
    conf_dir = %q
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"`, snapshotter, e.hostsDir(), cni, cni)))
	}
	e.ctd = testutil.StartContainerd(t, ctdOpts...)
	e.writeConfig(e.pkgs)
	e.daemon.start(e.config)
	return e
}

// writeConfig points the CLI at containerd and at the package set in dir.
func (e *env) writeConfig(pkgs string) {
	e.t.Helper()
	cfg := map[string]any{
		"containerd": map[string]any{"address": e.ctd.Address, "namespace": "default"},
		"nix":        map[string]any{"pkgs_path": pkgs, "options": testutil.NixOptions()},
	}
	if e.extraNix != nil {
		for k, v := range e.extraNix {
			cfg["nix"].(map[string]any)[k] = v
		}
	}
	if e.extraImage != nil {
		cfg["image"] = e.extraImage
	}
	if d := e.daemon; d == nil {
		// The CLI's cache lives under the snapshotter root: keep it here.
		if e.root == "" {
			e.root = e.t.TempDir()
		}
		cfg["snapshotter"] = map[string]any{"root": e.root}
		// No daemon to build in (nor one of the host's).
		cfg["api"] = map[string]any{"socket": ""}
	} else {
		cfg["snapshotter"] = map[string]any{"address": d.address, "root": d.root, "gc_roots_dir": d.gcRoots, "trust_other_images": d.trustOthers}
		cfg["registry"] = map[string]any{"address": d.http}
		cfg["api"] = map[string]any{"socket": d.socket}
		if d.tls != nil {
			cfg["registry"].(map[string]any)["tls_cert"] = d.tls.ServerCert
			cfg["registry"].(map[string]any)["tls_key"] = d.tls.ServerKey
			cfg["registry"].(map[string]any)["client_ca"] = d.tls.CA
		}
		cfg["metrics"] = map[string]any{"address": d.metrics}
		if d.unpackInto != nil {
			cfg["registry"].(map[string]any)["unpack_into"] = d.unpackInto
		}
		if d.earlyHeaders != "" {
			cfg["registry"].(map[string]any)["early_headers"] = d.earlyHeaders
		}
		if d.nixBin != "" {
			cfg["nix"].(map[string]any)["bin_dir"] = d.nixBin
		}
	}
	e.writeTOML(cfg)
}

// writeTOML writes cfg as the configuration.
func (e *env) writeTOML(cfg map[string]any) {
	e.t.Helper()
	b, err := toml.Marshal(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	if e.config == "" {
		e.config = filepath.Join(e.t.TempDir(), "config.toml")
	}
	if err := os.WriteFile(e.config, b, 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// readConfig reads the configuration back, to change it.
func (e *env) readConfig() map[string]any {
	e.t.Helper()
	b, err := os.ReadFile(e.config)
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := map[string]any{}
	if err := toml.Unmarshal(b, &cfg); err != nil {
		e.t.Fatal(err)
	}
	return cfg
}

// mustNixBuild builds attr of the env's package set and returns its
// output path.
func (e *env) mustNixBuild(attr string) string {
	e.t.Helper()
	pkgs := e.pkgs
	if pkgs == "" {
		pkgs = testutil.TestPkgs()
	}
	out, err := exec.Command("nix-build", append([]string{"--no-out-link", "-A", attr, pkgs}, nixOptionArgs()...)...).Output()
	if err != nil {
		e.t.Fatalf("nix-build -A %s: %v", attr, err)
	}
	return strings.TrimSpace(string(out))
}

// pull runs `nixery-snapshotter pull` and returns stdout, stderr and its error.
func (e *env) pull(args ...string) (string, string, error) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append([]string{"pull", "--config", e.config}, args...)...)
	if e.daemon != nil && e.daemon.nixDir != "" {
		c := e.daemon.command(binary, append([]string{"pull", "--config", e.config}, args...)...)
		cmd = exec.CommandContext(ctx, c.Path, c.Args[1:]...)
	}
	if e.path != "" {
		cmd.Env = append(os.Environ(), "PATH="+e.path)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		e.peakRSS = max(e.peakRSS, ru.Maxrss<<10)
	}
	return stdout.String(), stderr.String(), err
}

// mustPull pulls ref and returns the manifest digest it reports.
func (e *env) mustPull(args ...string) string {
	e.t.Helper()
	stdout, stderr, err := e.pull(args...)
	if err != nil {
		e.t.Fatalf("pull %v: %v\nstderr:\n%s", args, err, stderr)
	}
	fields := strings.Fields(stdout)
	if len(fields) != 2 || !strings.HasPrefix(fields[1], "sha256:") {
		e.t.Fatalf("pull %v printed %q, want NAME DIGEST", args, stdout)
	}
	return fields[1]
}

// run runs a container of image with ctr and returns its output. ctr
// flags may come first (--snapshotter=nix).
func (e *env) run(image string, args ...string) string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	id := fmt.Sprintf("c%d", time.Now().UnixNano())
	var flags []string
	for strings.HasPrefix(image, "--") {
		flags = append(flags, image)
		image, args = args[0], args[1:]
	}
	ctrArgs := append(append([]string{"--namespace", "default", "run", "--rm"}, flags...), image, id)
	cmd := e.ctd.Ctr(ctx, append(ctrArgs, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		e.t.Fatalf("ctr run %s %v: %v\n%s%s", image, args, err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func (e *env) ctx() context.Context {
	return namespaces.WithNamespace(context.Background(), "default")
}

// images lists the image records' names.
func (e *env) images() []string {
	e.t.Helper()
	imgs, err := e.ctd.Client.ImageService().List(e.ctx())
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, img := range imgs {
		names = append(names, img.Name)
	}
	sort.Strings(names)
	return names
}

// snapshots lists the names of the snapshots in snapshotter.
func (e *env) snapshots(snapshotter string) []string {
	e.t.Helper()
	var out []string
	err := e.ctd.Client.SnapshotService(snapshotter).Walk(e.ctx(), func(_ context.Context, info snapshots.Info) error {
		out = append(out, info.Name)
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// activeSnapshots lists the keys of snapshotter's active snapshots.
func (e *env) activeSnapshots(snapshotter string) []string {
	e.t.Helper()
	var out []string
	err := e.ctd.Client.SnapshotService(snapshotter).Walk(e.ctx(), func(_ context.Context, info snapshots.Info) error {
		if info.Kind == snapshots.KindActive {
			out = append(out, info.Name)
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// content lists the digests in the content store and any ingests.
func (e *env) content() []string {
	e.t.Helper()
	var out []string
	cs := e.ctd.Client.ContentStore()
	err := cs.Walk(e.ctx(), func(info content.Info) error {
		out = append(out, info.Digest.String())
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	statuses, err := cs.ListStatuses(e.ctx())
	if err != nil {
		e.t.Fatal(err)
	}
	for _, s := range statuses {
		out = append(out, "ingest:"+s.Ref)
	}
	sort.Strings(out)
	return out
}

// storePaths are the store paths a layer's annotations name (none for the
// symlink layer).
func storePaths(annotations map[string]string) []string {
	paths, symlinks, err := labels.LayerContent(annotations)
	if err != nil || symlinks {
		return nil
	}
	return paths
}

// symlinkPaths are the packages whose symlink forest a layer is.
func symlinkPaths(annotations map[string]string) []string {
	paths, symlinks, err := labels.LayerContent(annotations)
	if err != nil || !symlinks {
		return nil
	}
	return paths
}

// htopVersion is what the test package set's htop says it is: its own
// binary's first line of --version, run on the host from the store (the
// package set copies the host's htop, whose version is the host's).
var htopVersion = sync.OnceValue(func() string {
	out, err := exec.Command("nix-build", append([]string{"--no-out-link", "-A", "htop", testutil.TestPkgs()}, nixOptionArgs()...)...).Output()
	if err != nil {
		panic(fmt.Sprintf("building the test set's htop: %v", err))
	}
	version, err := exec.Command(filepath.Join(strings.TrimSpace(string(out)), "bin", "htop"), "--version").Output()
	if err != nil {
		panic(fmt.Sprintf("the test set's htop --version: %v", err))
	}
	return strings.SplitN(string(version), "\n", 2)[0]
})

// scriptPackages is a package set of the test set and, by attribute, a
// derivation for each script, which runs in bash and is built afresh in
// every test (salted): a build that logs, fails or takes its time.
func scriptPackages(t testing.TB, scripts map[string]string) string {
	t.Helper()
	salt := time.Now().String()
	var attrs strings.Builder
	for _, attr := range slices.Sorted(maps.Keys(scripts)) {
		fmt.Fprintf(&attrs, "  %s = derivation { name = %q; inherit system; builder = \"/bin/bash\"; PATH = \"/usr/bin:/bin\"; args = [ \"-c\" %q ]; salt = %q; };\n",
			attr, attr+"-1.0", scripts[attr], salt)
	}
	dir := t.TempDir()
	src := "{ system ? builtins.currentSystem, ... }:\nimport " + testutil.TestPkgs() + " { inherit system; } // {\n" + attrs.String() + "}\n"
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}
