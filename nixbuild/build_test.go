package nixbuild

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

func TestSourceArgument(t *testing.T) {
	hex := "0123456789abcdef0123456789abcdef01234567"
	for _, tc := range []struct {
		src    Source
		tag    string
		want   string
		pinned bool
	}{
		{Source{"path", "/pkgs"}, "latest", `{"path":"/pkgs","type":"path"}`, false},
		{Source{"path", "/pkgs"}, hex, `{"path":"/pkgs","type":"path"}`, false},
		{GitSource("https://example.org/pkgs.git"), "latest", `{"type":"git","url":"https://example.org/pkgs.git"}`, false},
		{GitSource("/srv/pkgs"), hex, `{"rev":"` + hex + `","type":"git","url":"/srv/pkgs"}`, true},
		{GitSource("/srv/pkgs"), "release-1", `{"ref":"release-1","type":"git","url":"/srv/pkgs"}`, false},
		{ChannelSource("nixos-24.05"), "latest", `{"type":"channel","url":"https://github.com/NixOS/nixpkgs/archive/nixos-24.05.tar.gz"}`, false},
		{ChannelSource("nixos-24.05"), hex, `{"type":"channel","url":"https://github.com/NixOS/nixpkgs/archive/` + hex + `.tar.gz"}`, true},
		{ChannelSource("<nixpkgs>"), "latest", `{"lookup":"nixpkgs","type":"channel"}`, false},
		{ChannelSource("https://mirror.example/nixpkgs.tar.gz"), "", `{"type":"channel","url":"https://mirror.example/nixpkgs.tar.gz"}`, false},
	} {
		got, err := tc.src.argument(tc.tag)
		if err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("%v tag %s: got %s, want %s", tc.src, tc.tag, got, tc.want)
		}
		if p := tc.src.Pinned(tc.tag); p != tc.pinned {
			t.Errorf("%v tag %s: pinned %v", tc.src, tc.tag, p)
		}
	}
	if _, err := (Source{}).argument("latest"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("zero source: %v", err)
	}
}

func TestSearchPath(t *testing.T) {
	inherited := "nixpkgs=https://example.org/nixpkgs.tar.gz:nixos-config=/etc/nixos/configuration.nix:/root/channels:other=/x"
	if got := ChannelSource("<nixpkgs>").searchPath("latest", inherited); got != "nixpkgs=https://example.org/nixpkgs.tar.gz" {
		t.Errorf("<nixpkgs>: %q", got)
	}
	for _, src := range []Source{{"path", "/pkgs"}, GitSource("/srv/pkgs"), ChannelSource("nixos-24.05")} {
		if got := src.searchPath("latest", inherited); got != "" {
			t.Errorf("%v: %q", src, got)
		}
	}
}

func TestParsePathInfo(t *testing.T) {
	const (
		glibc = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-glibc"
		htop  = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-htop"
	)
	want := []StorePath{
		{Path: glibc, NarSize: 10, References: []string{glibc}},
		{Path: htop, NarSize: 20, References: []string{glibc, htop}},
	}
	// The shapes each Nix prints (abridged: fields this project does not
	// read left out, narHash as each prints it).
	for name, in := range map[string]string{
		"nix-2.8 (a list)": `[{"path":"` + htop + `","narHash":"sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s","narSize":20,"references":["` + htop + `","` + glibc + `"],"valid":true},
		             {"path":"` + glibc + `","narSize":10,"references":["` + glibc + `"],"valid":true}]`,
		"nix-2.19 to 2.32, --json-format 1 (keyed by path)": `{"` + htop + `":{"narHash":"sha256-FePFYIlMuycIXPZbWi7LGEiMmZSX9FMbaQenWBzm1Sc=","narSize":20,"references":["` + htop + `","` + glibc + `"]},
		              "` + glibc + `":{"narSize":10,"references":["` + glibc + `"]}}`,
		"--json-format 2 (versioned, names)": `{"version":2,"storeDir":"/nix/store","info":{
		              "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-htop":{"narHash":"sha256-FePFYIlMuycIXPZbWi7LGEiMmZSX9FMbaQenWBzm1Sc=","narSize":20,"references":["bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-htop","aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-glibc"],"storeDir":"/nix/store","version":2},
		              "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-glibc":{"narSize":10,"references":["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-glibc"],"storeDir":"/nix/store","version":2}}}`,
	} {
		got, err := parsePathInfo([]byte(in))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !slices.EqualFunc(got, want, func(a, b StorePath) bool {
			return a.Path == b.Path && a.NarSize == b.NarSize && slices.Equal(a.References, b.References)
		}) {
			t.Errorf("%s: got %+v", name, got)
		}
	}
	for _, bad := range []string{`nope`, `{"/nix/store/x":null}`, `[{"narSize":1}]`,
		`{"version":2,"storeDir":"/nix/store","info":{"x":null}}`,
		`[{"path":"/etc/shadow","narSize":1}]`,
		`{"version":2,"storeDir":"/nix/store","info":{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x":{"references":["../../etc"]}}}`} {
		if _, err := parsePathInfo([]byte(bad)); err == nil {
			t.Errorf("%s parsed", bad)
		}
	}
}

func TestNixMessage(t *testing.T) {
	for name, log := range map[string]string{
		"nix-2.8":  "error: 'oldtool' has been renamed\n(use '--show-trace' to show detailed location information)",
		"nix-2.26": "error:\n       … while calling the 'foldl'' builtin\n         at /tmp/prepare.nix:66:8:\n           65|   x\n\n       (stack trace truncated; use '--show-trace' to show the full, detailed trace)\n\n       error: 'oldtool' has been renamed",
	} {
		if got := nixMessage(log); got != "'oldtool' has been renamed" {
			t.Errorf("%s: %q", name, got)
		}
	}
}

func TestParseNixVersion(t *testing.T) {
	for in, want := range map[string][2]int{"nix (Nix) 2.8.0\n": {2, 8}, "nix (Nix) 2.26.3": {2, 26}, "nix (Nix) 2.34.8pre": {2, 34}} {
		if got, ok := parseNixVersion(in); !ok || got != want {
			t.Errorf("%q: %v %v", in, got, ok)
		}
	}
	if _, ok := parseNixVersion("garbage"); ok {
		t.Error("garbage parsed")
	}
}

func TestTail(t *testing.T) {
	tl := newTail(3)
	for _, l := range []string{"a", "b", "c", "d", "e"} {
		tl.add(l)
	}
	if got := tl.String(); got != "c\nd\ne" {
		t.Errorf("tail = %q", got)
	}
	tl = newTail(3)
	tl.add("x")
	if got := tl.String(); got != "x" {
		t.Errorf("tail = %q", got)
	}
}

func newTestBuilder(t *testing.T, dir string, opts ...Opt) *Builder {
	t.Helper()
	testutil.RequireNix(t)
	src, err := PathSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	b := New(src, append([]Opt{WithOptions(testutil.NixOptions())}, opts...)...)
	t.Cleanup(func() { b.Close() })
	return b
}

func TestBuild(t *testing.T) {
	b := newTestBuilder(t, testutil.TestPkgs())
	res, err := b.Build(context.Background(), Request{
		Packages: []string{"1password", "haskellpackages.hello", "htop"},
		System:   "x86_64-linux",
	})
	if err != nil {
		t.Fatal(err)
	}
	// While the result is held, its packages are GC roots.
	roots, err := exec.Command("nix-store", "--gc", "--print-roots").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range res.Packages {
		if !strings.Contains(string(roots), p.Out) {
			t.Errorf("%s is not a GC root", p.Out)
		}
	}
	dir := res.roots.dir
	defer func() {
		res.Release()
		roots, _ := exec.Command("nix-store", "--gc", "--print-roots").Output()
		if strings.Contains(string(roots), dir) {
			t.Errorf("roots in %s outlive Release", dir)
		}
	}()
	var names []string
	for _, p := range res.Packages {
		names = append(names, p.Name)
		if _, err := os.Stat(p.Out); err != nil {
			t.Errorf("%s not realised: %v", p.Name, err)
		}
	}
	if !slices.Equal(names, []string{"1password", "haskellpackages.hello", "htop"}) {
		t.Errorf("packages %v", names)
	}
	byName := map[string]StorePath{}
	for _, sp := range res.Closure {
		byName[sp.Path[len("/nix/store/")+33:]] = sp
		if sp.NarSize <= 0 {
			t.Errorf("%s has narSize %d", sp.Path, sp.NarSize)
		}
	}
	for _, want := range []string{"htop-3.2.2", "glibc-2.36", "ncurses-6.4", "libnl-3.7.0", "hello-1.0", "1password-cli-2.0", "bash-interactive-5.2"} {
		if _, ok := byName[want]; !ok {
			t.Errorf("closure lacks %s: %v", want, res.Closure)
		}
	}
	if refs := byName["htop-3.2.2"].References; !slices.ContainsFunc(refs, func(r string) bool { return strings.HasSuffix(r, "-ncurses-6.4") }) {
		t.Errorf("htop does not reference ncurses: %v", refs)
	}
	// The script's shebang is a real runtime reference.
	if refs := byName["hello-1.0"].References; !slices.ContainsFunc(refs, func(r string) bool { return strings.HasSuffix(r, "-bash-interactive-5.2") }) {
		t.Errorf("hello does not reference bash: %v", refs)
	}
}

func TestBuildSystem(t *testing.T) {
	b := newTestBuilder(t, testutil.TestPkgs())
	x86, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	defer x86.Release()
	arm, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "aarch64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	defer arm.Release()
	if x86.Packages[0].Out == arm.Packages[0].Out {
		t.Errorf("aarch64-linux and x86_64-linux give the same store path %s", arm.Packages[0].Out)
	}
}

func TestBuildNotFound(t *testing.T) {
	b := newTestBuilder(t, testutil.TestPkgs())
	_, err := b.Build(context.Background(), Request{
		Packages: []string{"alsomissing", "haskellpackages.nosuch", "htop", "nosuchpkg", "htop.bin"},
		System:   "x86_64-linux",
	})
	var nf *NotFoundError
	if !errors.As(err, &nf) || !errdefs.IsNotFound(err) {
		t.Fatalf("got %v, want NotFoundError", err)
	}
	if want := []string{"alsomissing", "haskellpackages.nosuch", "nosuchpkg", "htop.bin"}; !slices.Equal(nf.Packages, want) {
		t.Errorf("missing %v, want %v", nf.Packages, want)
	}
	if !strings.Contains(err.Error(), "could not find Nix packages: [alsomissing haskellpackages.nosuch nosuchpkg htop.bin]") {
		t.Errorf("message %q", err)
	}

	_, err = b.Build(context.Background(), Request{Packages: []string{"haskellpackages"}, System: "x86_64-linux"})
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "haskellpackages") {
		t.Errorf("package set as package: %v", err)
	}
}

// writePkgs writes a package set that extends the test set with extra
// attributes given as Nix source.
func writePkgs(t *testing.T, extra string) string {
	t.Helper()
	dir := t.TempDir()
	src := `{ system ? builtins.currentSystem, ... }:
let base = import ` + testutil.TestPkgs() + ` { inherit system; }; in base // {
` + extra + `
}`
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestBuildFailure(t *testing.T) {
	dir := writePkgs(t, `broken = derivation {
    name = "broken-1.0"; inherit system; builder = "/bin/bash";
    args = [ "-c" "for i in $(seq 1 100); do echo line $i >&2; done; echo the-marker-of-failure >&2; exit 3" ];
    PATH = "/usr/bin:/bin";
    salt = "`+time.Now().String()+`";
  };`)
	b := newTestBuilder(t, dir)
	_, err := b.Build(context.Background(), Request{Packages: []string{"broken", "htop"}, System: "x86_64-linux"})
	var be *BuildError
	if !errors.As(err, &be) {
		t.Fatalf("got %v, want BuildError", err)
	}
	if be.Stage != "build" || !strings.Contains(be.Log, "the-marker-of-failure") {
		t.Errorf("stage %s, log:\n%s", be.Stage, be.Log)
	}
	if strings.Contains(be.Log, "line 5\n") {
		t.Errorf("log is not only the tail:\n%s", be.Log)
	}
}

func TestBuildEvalError(t *testing.T) {
	dir := writePkgs(t, `bad = abort "this package set is broken";`)
	b := newTestBuilder(t, dir)
	_, err := b.Build(context.Background(), Request{Packages: []string{"bad"}, System: "x86_64-linux"})
	var be *BuildError
	if !errors.As(err, &be) || be.Stage != "evaluate" || !strings.Contains(err.Error(), "this package set is broken") {
		t.Errorf("got %v", err)
	}
}

func TestBuildTimeout(t *testing.T) {
	dir := writePkgs(t, `hang = derivation {
    name = "hang-1.0"; inherit system; builder = "/bin/bash";
    args = [ "-c" "echo $$ > /tmp/nixbuild-hang-pid; exec sleep 600" ];
    PATH = "/usr/bin:/bin";
    salt = "`+time.Now().String()+`";
  };`)
	b := newTestBuilder(t, dir, WithTimeout(3*time.Second))
	start := time.Now()
	_, err := b.Build(context.Background(), Request{Packages: []string{"hang"}, System: "x86_64-linux"})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "timeout of 3s") {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("timeout took %s to take effect", d)
	}
	// The builder itself (in its own session under Nix) must be gone too.
	pid, err := os.ReadFile("/tmp/nixbuild-hang-pid")
	if err != nil {
		t.Fatal(err)
	}
	os.Remove("/tmp/nixbuild-hang-pid")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat("/proc/" + strings.TrimSpace(string(pid))); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("builder %s still runs after the timeout", pid)
		}
		time.Sleep(100 * time.Millisecond)
	}

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(time.Second, cancel)
	_, err = newTestBuilder(t, dir).Build(ctx, Request{Packages: []string{"hang"}, System: "x86_64-linux"})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancel: %v", err)
	}
}

// git runs git in dir.
func git(t *testing.T, dir string, args ...string) string { return testutil.Git(t, dir, args...) }

func TestBuildGitSource(t *testing.T) {
	testutil.RequireNix(t)
	testutil.RequireCommands(t, "git")
	// A repository whose package set gains a package on a branch.
	repo := t.TempDir()
	git(t, repo, "init", "-q", "-b", "main")
	write := func(extra string) {
		src := `{ system ? builtins.currentSystem, ... }: import ` + testutil.TestPkgs() + ` { inherit system; } // {` + extra + `}`
		if err := os.WriteFile(filepath.Join(repo, "default.nix"), []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		git(t, repo, "add", "default.nix")
		git(t, repo, "commit", "-q", "-m", "packages")
	}
	write("")
	first := git(t, repo, "rev-parse", "HEAD")
	git(t, repo, "checkout", "-q", "-b", "feature")
	write(` extra = (import ` + testutil.TestPkgs() + ` { inherit system; }).jq; `)
	git(t, repo, "checkout", "-q", "main")

	feature := git(t, repo, "rev-parse", "feature")
	b := New(GitSource("file://"+repo), WithOptions(testutil.NixOptions()), WithRevisions([]string{"latest", "feat*", first, feature}))
	defer b.Close()
	build := func(tag string) error {
		res, err := b.Build(context.Background(), Request{Packages: []string{"extra"}, System: "x86_64-linux", Tag: tag})
		res.Release()
		return err
	}
	if err := build("latest"); !errdefs.IsNotFound(err) {
		t.Errorf("default branch has extra: %v", err)
	}
	if err := build("feature"); err != nil {
		t.Errorf("ref feature: %v", err)
	}
	if err := build(first); !errdefs.IsNotFound(err) {
		t.Errorf("commit %s has extra: %v", first, err)
	}
	if err := build(feature); err != nil {
		t.Errorf("commit %s (on a branch that is not the default): %v", feature, err)
	}
	// A ref or commit the operator allows but the repository lacks is not
	// found, naming it.
	for _, tag := range []string{"feature-nope", "0123456789abcdef0123456789abcdef01234567"} {
		b := New(GitSource("file://"+repo), WithOptions(testutil.NixOptions()), WithRevisions([]string{"latest", "feat*", tag}))
		_, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux", Tag: tag})
		var re *RevisionError
		if !errdefs.IsNotFound(err) || !errors.As(err, &re) || !strings.Contains(err.Error(), tag) {
			t.Errorf("tag %s that the repository lacks: %v", tag, err)
		}
		b.Close()
	}
	// A ref the operator did not list is not fetched.
	git(t, repo, "branch", "other", "feature")
	if err := build("other"); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "[nix] revisions") {
		t.Errorf("unlisted ref: %v", err)
	}
}

// A channel given as a tarball URL (a nixpkgs release) is fetched first,
// then evaluated restricted to what was fetched: its default.nix may not
// read the host.
func TestBuildTarballSource(t *testing.T) {
	testutil.RequireNix(t)
	testutil.RequireCommands(t, "tar")
	dir := t.TempDir()
	set := filepath.Join(dir, "set")
	if err := os.Mkdir(set, 0o755); err != nil {
		t.Fatal(err)
	}
	src := `{ system ? builtins.currentSystem, ... }: import <nixery-test-pkgs> { inherit system; } // {
  secret = builtins.readFile /etc/hostname;
}`
	if err := os.WriteFile(filepath.Join(set, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	tarball := filepath.Join(dir, "set.tar.gz")
	if out, err := exec.Command("tar", "-czf", tarball, "-C", dir, "set").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	b := New(ChannelSource("file://"+tarball), WithOptions(testutil.NixOptions()))
	defer b.Close()
	res, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	res.Release()
	if !strings.HasSuffix(res.Packages[0].Out, "-htop-3.2.2") {
		t.Errorf("got %s", res.Packages[0].Out)
	}
	res, err = b.Build(context.Background(), Request{Packages: []string{"secret"}, System: "x86_64-linux"})
	res.Release()
	var be *BuildError
	if !errors.As(err, &be) || !strings.Contains(be.Log, "forbidden in restricted mode") {
		t.Errorf("a fetched package set read /etc/hostname: %v", err)
	}
}

// Without a package source and without <nixpkgs> on the search path, the
// error says what to set, not Nix's trace.
func TestBuildNoSource(t *testing.T) {
	testutil.RequireNix(t)
	b := New(ChannelSource("<nixpkgs>"), WithOptions(testutil.NixOptions()), WithOptions(map[string]string{"nix-path": ""}))
	defer b.Close()
	t.Setenv("NIX_PATH", "")
	_, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux"})
	var ns *NoSourceError
	if !errors.As(err, &ns) || !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "--pkgs-path") || strings.Contains(err.Error(), "--- end of nix log") {
		t.Errorf("no source: %v", err)
	}
}

// With a person watching Nix's log (a progress sink), the error does not
// print its end again.
func TestBuildErrorShownLog(t *testing.T) {
	dir := writePkgs(t, `bad = abort "this package was removed";`)
	var lines []string
	b := newTestBuilder(t, dir)
	ctx := progress.WithSink(context.Background(), progress.SinkFunc(func(e progress.Event) { lines = append(lines, e.Text) }))
	_, err := b.Build(ctx, Request{Packages: []string{"bad"}, System: "x86_64-linux"})
	if err == nil || strings.Contains(err.Error(), "this package was removed") || !strings.Contains(err.Error(), "log is above") {
		t.Errorf("error: %v", err)
	}
	if !slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, "this package was removed") }) {
		t.Errorf("the log shown lacks the message: %q", lines)
	}
}

func TestBuildChannelSearchPath(t *testing.T) {
	testutil.RequireNix(t)
	b := New(ChannelSource("<nixpkgs>"), WithOptions(testutil.NixOptions()))
	defer b.Close()
	t.Setenv("NIX_PATH", "nixpkgs="+testutil.TestPkgs())
	res, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	defer res.Release()
	if !strings.HasSuffix(res.Packages[0].Out, "-htop-3.2.2") {
		t.Errorf("got %s", res.Packages[0].Out)
	}
}

// A `nix-store --gc` right after evaluation, before anything is rooted,
// takes nothing the build needs: packages that were there are rooted
// through Nix or built again, missing ones are built by one Nix process
// that roots what it builds.
func TestBuildCollectedAfterEvaluation(t *testing.T) {
	salt := time.Now().String()
	dir := writePkgs(t, `fresh = derivation {
    name = "fresh-1.0"; inherit system; builder = "/bin/bash";
    args = [ "-c" "echo ok > $out; (sleep 0.2 &)" ];
    PATH = "/usr/bin:/bin";
    salt = "`+salt+`";
  };`)
	bin := t.TempDir()
	marker := filepath.Join(bin, "collected")
	for _, name := range []string{"nix-instantiate", "nix-build", "nix-store", "nix"} {
		real, err := exec.LookPath(name)
		if err != nil {
			t.Fatal(err)
		}
		script := "#!/bin/sh\nexec " + real + ` "$@"` + "\n"
		if name == "nix-instantiate" {
			// Evaluate, then collect everything that is not a root.
			script = "#!/bin/sh\n" + real + ` "$@"; rc=$?` + "\n" +
				`nix-store --gc >/dev/null 2>&1 && touch ` + marker + "\nexit $rc\n"
		}
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b := newTestBuilder(t, dir, WithBinDir(bin))
	for _, round := range []string{"missing", "present but not rooted"} {
		os.Remove(marker)
		res, err := b.Build(context.Background(), Request{Packages: []string{"fresh"}, System: "x86_64-linux"})
		if err != nil {
			t.Fatalf("%s: %v", round, err)
		}
		if _, err := os.Stat(marker); err != nil {
			t.Fatalf("%s: nothing was collected: %v", round, err)
		}
		if out, err := os.ReadFile(res.Packages[0].Out); err != nil || string(out) != "ok\n" {
			t.Errorf("%s: %s: %q, %v", round, res.Packages[0].Out, out, err)
		}
		res.Release()
	}
}

// A package set cannot read the host: evaluation is restricted to the
// package source.
func TestBuildRestrictedEvaluation(t *testing.T) {
	dir := writePkgs(t, `secret = derivation {
    name = "secret"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin";
    args = [ "-c" ("echo " + builtins.readFile /etc/shadow + " > $out") ];
  };`)
	_, err := newTestBuilder(t, dir).Build(context.Background(), Request{Packages: []string{"secret"}, System: "x86_64-linux"})
	var be *BuildError
	if !errors.As(err, &be) || be.Stage != "evaluate" || !strings.Contains(err.Error(), "forbidden in restricted mode") {
		t.Errorf("reading /etc/shadow: %v", err)
	}

	// Nor through the search path this process inherited (NixOS puts
	// nixos-config=/etc/nixos/configuration.nix there).
	t.Setenv("NIX_PATH", "hostsecret=/etc/passwd")
	dir = writePkgs(t, `leak = derivation {
    name = "leak"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin";
    args = [ "-c" ("echo " + builtins.readFile <hostsecret> + " > $out") ];
  };`)
	_, err = newTestBuilder(t, dir).Build(context.Background(), Request{Packages: []string{"leak"}, System: "x86_64-linux"})
	if err == nil || !strings.Contains(err.Error(), "'hostsecret' was not found") {
		t.Errorf("reading <hostsecret>: %v", err)
	}
}

// Tags are revisions only where the operator says so; anything else is
// refused before Nix runs.
func TestBuildRevisions(t *testing.T) {
	src, err := PathSource(testutil.TestPkgs())
	if err != nil {
		t.Fatal(err)
	}
	// No Nix at all in this bin directory: a refused request never gets there.
	b := New(src, WithBinDir(t.TempDir()))
	defer b.Close()
	for _, tag := range []string{"no-such-tag", "0123456789abcdef0123456789abcdef01234567", "nixos-24.05"} {
		_, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux", Tag: tag})
		if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), tag) {
			t.Errorf("tag %s: %v", tag, err)
		}
	}
	b = New(src, WithRevisions([]string{"latest", "nixos-*"}))
	for tag, ok := range map[string]bool{"latest": true, "": true, "nixos-24.05": true, "nixpkgs-unstable": false} {
		if err := b.CheckTag(tag); (err == nil) != ok {
			t.Errorf("tag %q: %v", tag, err)
		}
	}
}

// Hold makes paths roots of this process, and fails for a path that is gone.
// (Nix tells a collection already running of them: not tested here.)
func TestHold(t *testing.T) {
	res, err := newTestBuilder(t, testutil.TestPkgs()).Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	out := res.Packages[0].Out
	b := newTestBuilder(t, testutil.TestPkgs())
	held, err := b.Hold(context.Background(), []string{out})
	res.Release()
	if err != nil {
		t.Fatal(err)
	}
	roots, err := exec.Command("nix-store", "--gc", "--print-roots").Output()
	if err != nil {
		t.Fatal(err)
	}
	dir := held.dir
	if !strings.Contains(string(roots), dir) || !strings.Contains(string(roots), out) {
		t.Errorf("%s is not a root in %s:\n%s", out, dir, roots)
	}
	held.Release()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("roots outlive Release: %v", err)
	}

	// Roots not released go with the Builder.
	kept, err := b.Hold(context.Background(), []string{out})
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	if _, err := os.Stat(kept.dir); !os.IsNotExist(err) {
		t.Errorf("roots outlive Close: %v", err)
	}

	gone := "/nix/store/00000000000000000000000000000000-gone"
	if _, err := b.Hold(context.Background(), []string{out, gone}); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), gone) {
		t.Errorf("holding a path that is gone: %v", err)
	}

	// Strings that are not store paths never reach Nix (there is none in
	// this bin directory): options, other files, traversal.
	none := New(Source{}, WithBinDir(t.TempDir()))
	defer none.Close()
	for _, bad := range []string{"--option", "/etc/shadow", "/nix/store/../../etc/shadow", out + "/../../../etc", out + "\n/etc/shadow"} {
		if _, err := none.Hold(context.Background(), []string{out, bad}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("holding %q: %v", bad, err)
		}
	}
}

// Callers that give up do not break the holds of the others: one Nix
// serve process is shared, and a caller that leaves does not end it.
func TestHoldCancelledCallers(t *testing.T) {
	b := newTestBuilder(t, testutil.TestPkgs())
	res, err := b.Build(context.Background(), Request{Packages: []string{"htop"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	defer res.Release()
	paths := []string{res.Packages[0].Out}
	errs := make(chan error, 40)
	for i := range 40 {
		go func() {
			ctx := context.Background()
			if i%2 == 1 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, time.Duration(i)*100*time.Microsecond)
				defer cancel()
			}
			roots, err := b.Hold(ctx, paths)
			if i%2 == 1 {
				err = nil // may or may not have made it
			}
			roots.Release()
			errs <- err
		}()
	}
	for range 40 {
		if err := <-errs; err != nil {
			t.Errorf("a caller that did not give up: %v", err)
		}
	}
}

// Packages the package set refuses (unfree, broken, a removed alias) are
// named all at once, each with the package set's reason; nixpkgs' config,
// passed as data, lets the unfree one through.
func TestBuildRefused(t *testing.T) {
	b := newTestBuilder(t, testutil.TestPkgs())
	_, err := b.Build(context.Background(), Request{Packages: []string{"brokentool", "htop", "oldtool", "unfreetool"}, System: "x86_64-linux"})
	var refused *RefusedError
	if !errors.As(err, &refused) || !errdefs.IsPermissionDenied(err) {
		t.Fatalf("got %v, want a RefusedError", err)
	}
	if want := []string{"brokentool", "oldtool", "unfreetool"}; !slices.Equal(refused.Packages, want) {
		t.Errorf("refused %v, want %v", refused.Packages, want)
	}
	for p, reason := range map[string]string{
		"unfreetool": "has an unfree license (‘unfree’), refusing to evaluate",
		"brokentool": "is marked as broken, refusing to evaluate",
		"oldtool":    "'oldtool' has been renamed to/replaced by 'htop'",
	} {
		if got := refused.Reasons[p]; !strings.Contains(got, reason) || strings.Contains(got, "show-trace") {
			t.Errorf("%s: reason %q", p, got)
		}
		if !strings.Contains(err.Error(), reason) {
			t.Errorf("the message lacks %s's reason: %v", p, err)
		}
	}

	allowed := newTestBuilder(t, testutil.TestPkgs(), WithNixpkgsConfig(map[string]any{"allowUnfree": true}, nil))
	res, err := allowed.Build(context.Background(), Request{Packages: []string{"unfreetool"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatalf("unfree with allowUnfree: %v", err)
	}
	res.Release()
	if _, err := allowed.Build(context.Background(), Request{Packages: []string{"brokentool"}, System: "x86_64-linux"}); !errdefs.IsPermissionDenied(err) {
		t.Errorf("broken with only allowUnfree: %v", err)
	}
}

// Overlays are paths the operator names; evaluation may read them.
func TestBuildOverlay(t *testing.T) {
	overlay := filepath.Join(t.TempDir(), "overlay.nix")
	if err := os.WriteFile(overlay, []byte(`self: super: { fromoverlay = super.htop; }`), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// A package set that applies overlays, as nixpkgs does.
	src := `{ system ? builtins.currentSystem, overlays ? [ ], ... }:
let base = import ` + testutil.TestPkgs() + ` { inherit system; };
in builtins.foldl' (acc: o: acc // o acc base) base overlays`
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	b := newTestBuilder(t, dir, WithNixpkgsConfig(nil, []string{overlay}))
	res, err := b.Build(context.Background(), Request{Packages: []string{"fromoverlay"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatalf("a package from an overlay: %v", err)
	}
	res.Release()
}

// A package of several outputs puts in an image what meta.outputsToInstall
// says (nixpkgs' openssl: bin and man, not the libraries); an attribute
// path that names an output puts that one.
func TestBuildOutputsToInstall(t *testing.T) {
	b := newTestBuilder(t, testutil.TestPkgs())
	res, err := b.Build(context.Background(), Request{Packages: []string{"openssl", "openssl.out"}, System: "x86_64-linux"})
	if err != nil {
		t.Fatal(err)
	}
	defer res.Release()
	suffixes := func(paths []string) []string {
		var out []string
		for _, p := range paths {
			out = append(out, p[strings.LastIndex(p, "-")+1:])
		}
		return out
	}
	if got := suffixes(res.Packages[0].Outs); !slices.Equal(got, []string{"bin", "man"}) {
		t.Errorf("openssl installs %v, want its bin and man outputs", res.Packages[0].Outs)
	}
	if got := res.Packages[1].Outs; len(got) != 1 || strings.HasSuffix(got[0], "-bin") || strings.HasSuffix(got[0], "-man") {
		t.Errorf("openssl.out installs %v", got)
	}
	for _, p := range append(res.Packages[0].Outs, res.Packages[1].Outs...) {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s not realised: %v", p, err)
		}
		if !slices.ContainsFunc(res.Closure, func(sp StorePath) bool { return sp.Path == p }) {
			t.Errorf("%s not in the closure", p)
		}
	}
}

// Recorded fetch failures of Nix 2.8 and 2.26: a revision that does not
// exist, and a remote that could not be asked (which is not "no such
// revision", whatever follows).
func TestIsNoRevision(t *testing.T) {
	for log, want := range map[string]bool{
		"fatal: ambiguous argument 'nope': unknown revision or path not in the working tree.\nerror: program 'git' failed with exit code 128":                                                                                                                                  true,
		"error: Cannot find Git revision '0123456789abcdef0123456789abcdef01234567' in ref 'main' of repository '/tmp/gr'!":                                                                                                                                                    true,
		"       error: resolving Git reference 'nope': revspec 'nope' not found":                                                                                                                                                                                               true,
		"       error: getting Git object '0123456789abcdef0123456789abcdef01234567': object not found - no match for id (0123)":                                                                                                                                               true,
		"fatal: couldn't find remote ref refs/heads/nope\nerror: program 'git' failed with exit code 128":                                                                                                                                                                      true,
		"fatal: unable to access 'https://example.org/x/': Could not resolve host: example.org\nwarning: could not update local clone of Git repository 'https://example.org/x'; continuing with the most recent version\nerror: Cannot find Git revision 'abc' in ref 'main'": false,
		"error: program 'git' failed with exit code 128": false,
	} {
		if got := isNoRevision(log); got != want {
			t.Errorf("isNoRevision(%q) = %v, want %v", log, got, want)
		}
	}
}

// A flake is a package source: names resolve in packages.<system> before
// legacyPackages.<system>, missing ones are named as for any source, and
// a tag selects a commit (git+file) that pins the package set.
func TestBuildFlakeSource(t *testing.T) {
	testutil.RequireNix(t)
	testutil.RequireCommands(t, "git")
	repo := t.TempDir()
	first := testutil.FlakeRepo(t, repo, `htop = pkgs.jq; tool = pkgs.htop;`)
	second := testutil.FlakeRepo(t, repo, `htop = pkgs.jq; tool = pkgs.jq;`)

	outOf := func(b *Builder, tag, pkg string) (string, error) {
		res, err := b.Build(context.Background(), Request{Packages: []string{pkg}, System: "x86_64-linux", Tag: tag})
		if err != nil {
			return "", err
		}
		defer res.Release()
		for _, p := range res.Packages {
			if p.Name == pkg {
				return p.Out, nil
			}
		}
		return "", fmt.Errorf("%s not in %+v", pkg, res.Packages)
	}
	for _, ref := range []string{"path:" + repo, "git+file://" + repo} {
		src, err := FlakeSource(ref)
		if err != nil {
			t.Fatal(err)
		}
		b := New(src, WithOptions(testutil.NixOptions()), WithRevisions([]string{"latest", first}))
		// packages.<system> first: its htop is jq.
		if out, err := outOf(b, "latest", "htop"); err != nil || !strings.Contains(out, "-jq-") {
			t.Errorf("%s: htop is %q, %v; want packages' (jq)", ref, out, err)
		}
		// Then legacyPackages.
		if out, err := outOf(b, "latest", "git"); err != nil || !strings.Contains(out, "-git-") {
			t.Errorf("%s: git is %q, %v", ref, out, err)
		}
		if _, err := outOf(b, "latest", "nosuchpackage"); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "nosuchpackage") {
			t.Errorf("%s: a missing package: %v", ref, err)
		}
		b.Close()
	}

	src, _ := FlakeSource("git+file://" + repo)
	if src.Pinned("latest") || !src.Pinned(first) {
		t.Errorf("pinned: latest %v, %s %v", src.Pinned("latest"), first, src.Pinned(first))
	}
	b := New(src, WithOptions(testutil.NixOptions()), WithRevisions([]string{"latest", first, second}))
	defer b.Close()
	if out, err := outOf(b, first, "tool"); err != nil || !strings.Contains(out, "-htop-") {
		t.Errorf("tool at %s is %q, %v; want htop", first, out, err)
	}
	if out, err := outOf(b, second, "tool"); err != nil || !strings.Contains(out, "-jq-") {
		t.Errorf("tool at %s is %q, %v; want jq", second, out, err)
	}
	// A revision the operator allows but the flake lacks is not found,
	// naming it, as for git.
	for _, tag := range []string{"feature-nope", "0123456789abcdef0123456789abcdef01234567"} {
		b := New(src, WithOptions(testutil.NixOptions()), WithRevisions([]string{tag}))
		_, err := outOf(b, tag, "htop")
		var re *RevisionError
		if !errdefs.IsNotFound(err) || !errors.As(err, &re) || !strings.Contains(err.Error(), tag) {
			t.Errorf("tag %s that the flake lacks: %v", tag, err)
		}
		b.Close()
	}
}
