package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

func TestPullAndRun(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		ref  string
		args []string
		want string
	}{
		{"nix.local/shell/htop", []string{"htop", "--version"}, htopVersion()},
		{"nix.local/shell", []string{"bash", "-c", "echo ok"}, "ok\n"},
		{"nix.local/git", []string{"git", "--version"}, "git version 2."},
		{"nix.local/jq", []string{"jq", "-n", "[1,2] | add"}, "3\n"},
		{"nix.local/haskellpackages.hello", []string{"hello"}, "Hello from haskellPackages.hello"},
		{"nix.local/1password", []string{"op"}, "op 2.0"},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			e.t = t
			e.mustPull(tc.ref)
			// ctr does not normalise names: both spellings must exist.
			for _, name := range []string{tc.ref, tc.ref + ":latest"} {
				if out := e.run(name, tc.args...); !strings.Contains(out, tc.want) {
					t.Errorf("%s %v printed %q, want %q", name, tc.args, out, tc.want)
				}
			}
		})
	}
	e.t = t

	// The shell image is set up for people: bash by default, PATH,
	// certificates, a writable /tmp, /usr/bin/env.
	cfg := e.config_(t, "nix.local/shell:latest")
	if !slices.Equal(cfg.Config.Cmd, []string{"bash"}) {
		t.Errorf("Cmd %v", cfg.Config.Cmd)
	}
	for _, want := range []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"} {
		if !slices.Contains(cfg.Config.Env, want) {
			t.Errorf("Env %v lacks %s", cfg.Config.Env, want)
		}
	}
	out := e.run("nix.local/shell", "bash", "-c", "stat -c %a /tmp; test -s /etc/ssl/certs/ca-bundle.crt && echo certs; /usr/bin/env echo env; ls /nix/store | wc -l")
	if want := "1777\ncerts\nenv\n"; !strings.HasPrefix(out, want) {
		t.Errorf("shell image: got %q, want %q first", out, want)
	}
	if cfg := e.config_(t, "nix.local/git:latest"); cfg.Config.Cmd != nil {
		t.Errorf("git image has Cmd %v without bash", cfg.Config.Cmd)
	}
}

// A pull into an ordinary snapshotter unpacks layers straight from the
// store into snapshots: no layer blob is stored, containerd's unpack finds
// the snapshots by chain ID, its garbage collector keeps and removes them
// with the image, and a second pull touches nothing. --with-layers adds
// the blobs, for export.
func TestPullIntoSnapshots(t *testing.T) {
	e := newEnv(t)
	e.mustPull("--snapshotter", "overlayfs", "nix.local/git")
	m, record := e.manifest(t, "nix.local/git:latest")
	cs := e.ctd.Client.ContentStore()
	for _, l := range m.Layers {
		if _, err := cs.Info(e.ctx(), l.Digest); !errdefs.IsNotFound(err) {
			t.Errorf("layer %s is in the content store (%v)", l.Digest, err)
		}
	}
	var cfg ocispec.Image
	e.readJSON(t, m.Config, &cfg)
	top := identity.ChainID(cfg.RootFS.DiffIDs).String()
	info, err := cs.Info(e.ctx(), m.Config.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Labels["containerd.io/gc.ref.snapshot.overlayfs"]; got != top {
		t.Errorf("config's snapshot GC label %q, want %s", got, top)
	}
	// The manifest keeps its children as containerd's pull labels them.
	minfo, err := cs.Info(e.ctx(), record.Target.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if got := minfo.Labels["containerd.io/gc.ref.content.config"]; got != m.Config.Digest.String() {
		t.Errorf("manifest's config GC label %q, want %s", got, m.Config.Digest)
	}
	for i, l := range m.Layers {
		if got := minfo.Labels[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", i)]; got != l.Digest.String() {
			t.Errorf("manifest's GC label of layer %d: %q, want %s", i, got, l.Digest)
		}
	}
	sns := e.snapshots("overlayfs")
	if len(sns) != len(m.Layers) || !slices.Contains(sns, top) {
		t.Errorf("snapshots %v: want the %d of chain %s", sns, len(m.Layers), top)
	}
	// Each layer's snapshot is on the chain below it (layers unpacked at
	// once are committed onto their parents).
	for i := range cfg.RootFS.DiffIDs {
		chain, parent := identity.ChainID(cfg.RootFS.DiffIDs[:i+1]).String(), ""
		if i > 0 {
			parent = identity.ChainID(cfg.RootFS.DiffIDs[:i]).String()
		}
		info, err := e.ctd.Client.SnapshotService("overlayfs").Stat(e.ctx(), chain)
		if err != nil || info.Parent != parent || info.Kind != snapshots.KindCommitted {
			t.Errorf("snapshot of layer %d: %+v, %v; want committed on %q", i+1, info, err, parent)
		}
	}
	if out := e.run("nix.local/git", "git", "--version"); !strings.Contains(out, "git version 2.") {
		t.Errorf("git --version printed %q", out)
	}

	// Again: every layer is found, none is read.
	_, stderr, err := e.pull("--log-level", "debug", "--snapshotter", "overlayfs", "nix.local/git")
	if err != nil {
		t.Fatalf("second pull: %v\n%s", err, stderr)
	}
	if strings.Contains(stderr, "packed layer") || !slices.Equal(e.snapshots("overlayfs"), sns) {
		t.Errorf("second pull unpacked again: snapshots %v\n%s", e.snapshots("overlayfs"), stderr)
	}
	if !strings.Contains(stderr, "registered and unpacked into overlayfs already") {
		t.Errorf("second pull registered the image again:\n%s", stderr)
	}

	// Blobs on request make the image exportable.
	e.mustPull("--with-layers", "--snapshotter", "overlayfs", "nix.local/git")
	for _, l := range m.Layers {
		if _, err := cs.Info(e.ctx(), l.Digest); err != nil {
			t.Errorf("--with-layers: layer %s: %v", l.Digest, err)
		}
	}
	if out, err := e.ctd.Ctr(e.ctx(), "images", "export", filepath.Join(t.TempDir(), "git.tar"), "nix.local/git:latest").CombinedOutput(); err != nil {
		t.Errorf("export: %v\n%s", err, out)
	}

	// Snapshots that containerd unpacked from blobs are found too.
	other := newEnv(t)
	other.mustPull("--with-layers", "--snapshotter", "overlayfs", "nix.local/jq")
	if _, stderr, err := other.pull("--log-level", "debug", "--snapshotter", "overlayfs", "nix.local/jq"); err != nil || strings.Contains(stderr, "packed layer") {
		t.Errorf("pull after containerd unpacked the layers: %v\n%s", err, stderr)
	}

	// The snapshots go with the image.
	if out, err := e.ctd.Ctr(e.ctx(), "images", "rm", "--sync", "nix.local/git", "nix.local/git:latest").CombinedOutput(); err != nil {
		t.Fatalf("images rm: %v\n%s", err, out)
	}
	if sns := e.snapshots("overlayfs"); len(sns) != 0 {
		t.Errorf("snapshots after the image was removed: %v", sns)
	}
}

// config_ reads the image config of a registered image.
func (e *env) config_(t testing.TB, name string) ocispec.Image {
	t.Helper()
	m, img := e.manifest(t, name)
	_ = img
	var cfg ocispec.Image
	e.readJSON(t, m.Config, &cfg)
	return cfg
}

func (e *env) manifest(t testing.TB, name string) (ocispec.Manifest, images.Image) {
	t.Helper()
	img, err := e.ctd.Client.ImageService().Get(e.ctx(), name)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	e.readJSON(t, img.Target, &m)
	return m, img
}

func (e *env) readJSON(t testing.TB, desc ocispec.Descriptor, v any) {
	t.Helper()
	b, err := content.ReadBlob(e.ctx(), e.ctd.Client.ContentStore(), desc)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

func TestPullMissingPackages(t *testing.T) {
	bin, calls := countingNix(t)
	for _, e := range []*env{newEnv(t), newNixEnv(t, func(e *env) { e.daemon.nixBin = bin })} {
		e.mustPull("nix.local/htop")
		images, blobs := e.images(), e.content()
		before := evaluations(t, calls)

		_, stderr, err := e.pull("nix.local/nosuchpkg/alsomissing")
		if err == nil {
			t.Fatal("pull of missing packages succeeded")
		}
		if !strings.Contains(stderr, "could not find Nix packages: [alsomissing nosuchpkg]") {
			t.Errorf("stderr does not name both packages:\n%s", stderr)
		}
		e.unchanged(images, blobs)
		if e.daemon != nil {
			if n := evaluations(t, calls) - before; n != 1 {
				t.Errorf("the daemon evaluated %d times for missing packages", n)
			}
		}

		// Refused by the package set (nixpkgs-shaped: unfree, broken, a
		// removed alias): each named, with its reason, at once.
		_, stderr, err = e.pull("nix.local/htop/unfreetool/brokentool/oldtool")
		if err == nil {
			t.Fatal("pull of refused packages succeeded")
		}
		for _, want := range []string{"the package set refuses: [brokentool oldtool unfreetool]", "unfree license", "marked as broken", "renamed to/replaced by"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("stderr lacks %q:\n%s", want, stderr)
			}
		}
		e.unchanged(images, blobs)
	}
}

func TestPullBuildFailure(t *testing.T) {
	e := newEnv(t)
	dir := scriptPackages(t, map[string]string{"broken": "echo compiling >&2; echo 'error: the-marker-of-failure' >&2; exit 2"})
	e.writeConfig(dir)
	_, stderr, err := e.pull("nix.local/htop/broken")
	if err == nil {
		t.Fatal("pull of a failing package succeeded")
	}
	// Nix's log, shown as it came, and not again with the error.
	if strings.Count(stderr, "the-marker-of-failure") != 1 || strings.Contains(stderr, "end of nix log") {
		t.Errorf("stderr does not show Nix's log once:\n%s", stderr)
	}
	if got := e.images(); len(got) != 0 {
		t.Errorf("images after a failed build: %v", got)
	}
	if got := e.content(); len(got) != 0 {
		t.Errorf("content after a failed build: %v", got)
	}
}

// A failure after the layers were written leaves nothing behind either.
func TestPullFailureAfterLayers(t *testing.T) {
	e := newEnv(t)
	// Full layers are written as blobs before the snapshotter is needed.
	// (The layers htop shares with git are git's blobs whenever they
	// exist: written with git's, so that only htop's own are at stake.)
	e.mustPull("--with-layers", "nix.local/git")
	images, blobs := e.images(), e.content()
	_, stderr, err := e.pull("--with-layers", "--snapshotter", "nosuchsnapshotter", "nix.local/shell/htop")
	if err == nil {
		t.Fatal("pull into a missing snapshotter succeeded")
	}
	if !strings.Contains(stderr, "nosuchsnapshotter") {
		t.Errorf("stderr does not name the snapshotter:\n%s", stderr)
	}
	if !strings.Contains(stderr, "layer 1/") {
		t.Errorf("failed before writing layers; the test no longer tests cleanup:\n%s", stderr)
	}
	e.unchanged(images, blobs)
}

func TestPullBadReferences(t *testing.T) {
	e := newEnv(t)
	// Nix commands that record being called: none of them may be.
	fake := t.TempDir()
	marker := filepath.Join(fake, "nix-was-called")
	for _, name := range []string{"nix", "nix-instantiate", "nix-store", "nix-build"} {
		script := "#!/bin/sh\necho \"$0 $*\" >> " + marker + "\nexit 1\n"
		if err := os.WriteFile(filepath.Join(fake, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.path = fake + ":" + os.Getenv("PATH")
	for _, ref := range []string{
		"nix.local/Htop",
		"nix.local/htop/../../etc",
		"nix.local//htop",
		"nix.local/htop${builtins.abort}",
		`nix.local/"htop"`,
		"nix.local/htop;id",
		"nix.local/xorg..xev",
		"nix.local/.hidden",
		"docker.io/library/htop",
		"htop",
		"nix.local/htop@sha256:" + strings.Repeat("0", 64),
		"nix.local/" + strings.Repeat("a", 256),
		"nix.local/hto\u0440",
		"",
	} {
		_, stderr, err := e.pull(ref)
		if err == nil {
			t.Errorf("%q: pull succeeded", ref)
			continue
		}
		if !strings.Contains(stderr, "invalid reference") {
			t.Errorf("%q: stderr does not say the reference is invalid:\n%s", ref, stderr)
		}
	}
	if b, err := os.ReadFile(marker); err == nil {
		t.Errorf("Nix was called:\n%s", b)
	}
	// The fake Nix is really on the CLI's PATH.
	if _, _, err := e.pull("nix.local/htop"); err == nil {
		t.Fatal("pull with a failing Nix succeeded")
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("a valid reference did not reach the fake Nix: %v", err)
	}
}

func TestPullReproducible(t *testing.T) {
	e := newEnv(t)
	first := e.mustPull("nix.local/shell/htop")
	if again := e.mustPull("nix.local/shell/htop"); again != first {
		t.Errorf("second pull gave %s, first %s", again, first)
	}
	if a, b := e.mustPull("nix.local/git/htop"), e.mustPull("nix.local/htop/git"); a != b {
		t.Errorf("git/htop gave %s, htop/git %s", a, b)
	}
	m1, _ := e.manifest(t, "nix.local/shell/htop:latest")

	// A fresh containerd gives the same bytes.
	other := newEnv(t)
	if d := other.mustPull("nix.local/shell/htop"); d != first {
		t.Errorf("fresh containerd gave %s, first %s", d, first)
	}
	// Built in the daemon, unpacked here or stored as blobs: the same.
	daemon := newNixEnv(t)
	for _, args := range [][]string{{"--snapshotter", "overlayfs"}, {"--snapshotter", "overlayfs", "--with-layers"}} {
		if d := daemon.mustPull(append(args, "nix.local/shell/htop")...); d != first {
			t.Errorf("built in the daemon (%v) gave %s, first %s", args, d, first)
		}
	}
	m2, _ := other.manifest(t, "nix.local/shell/htop:latest")
	if len(m1.Layers) != len(m2.Layers) {
		t.Fatalf("%d layers, then %d", len(m1.Layers), len(m2.Layers))
	}
	for i := range m1.Layers {
		if m1.Layers[i].Digest != m2.Layers[i].Digest {
			t.Errorf("layer %d: %s, then %s", i, m1.Layers[i].Digest, m2.Layers[i].Digest)
		}
	}
	if len(m1.Layers) < 3 {
		t.Errorf("only %d layers for shell/htop", len(m1.Layers))
	}
	// Every layer but the symlink layer names its store paths for the
	// snapshotter, and together they are the closure.
	var paths []string
	for _, l := range m1.Layers[:len(m1.Layers)-1] {
		p := storePaths(l.Annotations)
		if len(p) == 0 {
			t.Errorf("layer %s names no store paths", l.Digest)
		}
		paths = append(paths, p...)
	}
	if p := storePaths(m1.Layers[len(m1.Layers)-1].Annotations); len(p) != 0 {
		t.Errorf("symlink layer names store paths %v", p)
	}
	var htop string
	for _, p := range paths {
		if strings.HasSuffix(p, "-htop-3.2.2") {
			htop = p
		}
	}
	closure, err := exec.Command("nix-store", "--query", "--requisites", htop).Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range strings.Fields(string(closure)) {
		if !slices.Contains(paths, p) {
			t.Errorf("htop's closure member %s is in no layer", p)
		}
	}
}

func TestPullArm64(t *testing.T) {
	e := newEnv(t)
	e.mustPull("nix.local/shell/arm64")
	cfg := e.config_(t, "nix.local/shell/arm64:latest")
	if cfg.Architecture != "arm64" || cfg.OS != "linux" {
		t.Errorf("platform %s/%s, want linux/arm64", cfg.OS, cfg.Architecture)
	}
	m, _ := e.manifest(t, "nix.local/shell/arm64:latest")
	checkBuiltFor(t, m, "aarch64-linux")
}

// checkBuiltFor fails the test unless m names store paths and each was
// built by a derivation for system.
func checkBuiltFor(t *testing.T, m ocispec.Manifest, system string) {
	t.Helper()
	var checked int
	for _, l := range m.Layers {
		for _, p := range storePaths(l.Annotations) {
			if s := builtFor(t, p); s != system {
				t.Errorf("%s was built for %q, want %s", p, s, system)
			}
			checked++
		}
	}
	if checked == 0 {
		t.Error("the image names no store paths")
	}
}

// builtFor is the Nix system of the derivation that built store path p.
func builtFor(t *testing.T, p string) string {
	t.Helper()
	drv, err := exec.Command("nix-store", "--query", "--deriver", p).Output()
	if err != nil {
		t.Fatalf("deriver of %s: %v", p, err)
	}
	system, err := exec.Command("nix-store", "--query", "--binding", "system", strings.TrimSpace(string(drv))).Output()
	if err != nil {
		t.Fatalf("system of %s: %v", drv, err)
	}
	return strings.TrimSpace(string(system))
}

// unchanged fails the test unless the image records and the content store
// (blobs and ingests) are as they were.
func (e *env) unchanged(images, blobs []string) {
	e.t.Helper()
	if got := e.images(); !slices.Equal(got, images) {
		e.t.Errorf("images %v, before %v", got, images)
	}
	if got := e.content(); !slices.Equal(got, blobs) {
		e.t.Errorf("content changed:\n%v\nbefore:\n%v", got, blobs)
	}
}

// An image of a package of several outputs holds what nixpkgs installs of
// it (meta.outputsToInstall): its programs and manual, not its libraries.
func TestPullOutputsToInstall(t *testing.T) {
	e := newEnv(t)
	e.mustPull("nix.local/shell/openssl")
	got := e.run("nix.local/shell/openssl", "bash", "-c", "openssl; test -e /share/man/man1/openssl.1 && echo man; test -e /lib/libssl.so.3 && echo lib || echo no lib")
	if got != "OpenSSL 3.0.16\nman\nno lib\n" {
		t.Errorf("the container sees %q", got)
	}
}

// A package set in a git repository, as `--pkgs-git` names it: fetched by
// Nix, then evaluated restricted to the fetched tree (on every Nix: 2.19
// and later check fetchGit's URL against allowed-uris with its query). A
// tag that is a commit selects that revision.
func TestPullGitSource(t *testing.T) {
	testutil.RequireCommands(t, "git")
	repo := t.TempDir()
	git := func(args ...string) string { return testutil.Git(t, repo, args...) }
	commit := func(set string) string {
		if err := os.WriteFile(filepath.Join(repo, "default.nix"), []byte(set), 0o644); err != nil {
			t.Fatal(err)
		}
		git("add", "default.nix")
		git("commit", "-q", "-m", "package set")
		return git("rev-parse", "HEAD")
	}
	git("init", "-q", "-b", "main")
	first := commit(`args: import <nixery-test-pkgs> args`)
	commit(`args: import <nixery-test-pkgs> args // { htop = throw "htop was removed"; }`)

	e := newEnv(t)
	e.extraNix = map[string]any{"revisions": []string{"latest", first}}
	e.writeConfig(testutil.TestPkgs())
	_, stderr, err := e.pull("--pkgs-git", "file://"+repo, "nix.local/htop")
	if err == nil || !strings.Contains(stderr, "htop was removed") {
		t.Errorf("pull of the default branch, whose htop throws: %v\n%s", err, stderr)
	}
	e.mustPull("--pkgs-git", "file://"+repo, "nix.local/htop:"+first)
	if out := e.run("nix.local/htop:"+first, "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}
}

// pull against a running daemon shows what the daemon does as it does it,
// as pull does when it builds by itself: Nix's build log, then each
// layer, then the result.
func TestPullInDaemonShowsProgress(t *testing.T) {
	dir := scriptPackages(t, map[string]string{"loud": "echo the-marker-of-building >&2; mkdir -p $out/bin; echo loud > $out/bin/loud"})
	e := newNixEnv(t, withPkgs(dir))
	stdout, stderr, err := e.pull("nix.local/htop/loud")
	if err != nil {
		t.Fatalf("pull: %v\n%s", err, stderr)
	}
	if !strings.HasPrefix(stdout, "nix.local/htop/loud:latest sha256:") {
		t.Errorf("stdout %q", stdout)
	}
	t.Logf("pull:\n%s", stderr)
	lines := strings.Split(stderr, "\n")
	at := func(match func(string) bool, what string) int {
		i := slices.IndexFunc(lines, match)
		if i < 0 {
			t.Fatalf("stderr shows no %s:\n%s", what, stderr)
		}
		return i
	}
	daemon := at(func(l string) bool { return strings.Contains(l, "building in the daemon on "+e.daemon.socket) }, "build in the daemon")
	nixLog := at(func(l string) bool {
		return strings.HasPrefix(l, "  nix:") && strings.Contains(l, "the-marker-of-building")
	}, "Nix build log")
	layer := at(func(l string) bool { return strings.Contains(l, "layer 1/") }, "first layer")
	last := at(func(l string) bool { return strings.Contains(l, "symlinks") && strings.Contains(l, "layer ") }, "symlink layer")
	done := at(func(l string) bool { return strings.Contains(l, ": done in ") }, "end")
	if !(daemon < nixLog && nixLog < layer && layer < last && last < done) {
		t.Errorf("progress out of order (daemon %d, nix %d, layer %d, symlinks %d, done %d):\n%s", daemon, nixLog, layer, last, done, stderr)
	}
	if n := strings.Count(stderr, "the-marker-of-building"); n != 1 {
		t.Errorf("Nix's log line shown %d times:\n%s", n, stderr)
	}
	if !strings.Contains(e.daemon.log(), "building for the CLI") {
		t.Error("the daemon's log does not show it built for the CLI")
	}
}
