package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// fakeNix "builds" any package as a store path that needs a shared glibc,
// counting builds; a build waits for gate when it is set.
type fakeNix struct {
	builds atomic.Int64
	gate   chan struct{}
	fail   error
	log    string // a line of Nix's log each build shows
	// pin is what Pin says; a build sets it to movesTo, if that is set.
	pin, movesTo atomic.Value
	// store, if set, is made to hold what builds return (which is below it).
	store string
}

// path is the store path of package name.
func (f *fakeNix) path(name string) string {
	if f.store == "" {
		return fakePath(name)
	}
	p := filepath.Join(f.store, fakePath(name))
	os.MkdirAll(p, 0o755)
	return p
}

func (f *fakeNix) Pin(context.Context, string) string {
	pin, _ := f.pin.Load().(string)
	return pin
}

func (f *fakeNix) Build(ctx context.Context, req nixbuild.Request) (*nixbuild.Result, error) {
	f.builds.Add(1)
	if to, _ := f.movesTo.Swap("").(string); to != "" {
		f.pin.Store(to)
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if f.log != "" {
		progress.Nix(ctx, f.log)
	}
	if f.fail != nil {
		return nil, f.fail
	}
	glibc := f.path("glibc-2.36")
	res := &nixbuild.Result{Closure: []nixbuild.StorePath{{Path: glibc, NarHash: "sha256-glibc", NarSize: 1 << 20}}}
	for _, name := range req.Packages {
		p := f.path(name)
		res.Packages = append(res.Packages, nixbuild.Package{Name: name, Out: p, Outs: []string{p}})
		res.Closure = append(res.Closure, nixbuild.StorePath{Path: p, NarHash: "sha256-" + name, NarSize: 1 << 16, References: []string{glibc}})
	}
	slices.SortFunc(res.Closure, func(a, b nixbuild.StorePath) int { return strings.Compare(a.Path, b.Path) })
	return res, nil
}

func fakePath(name string) string {
	return "/nix/store/" + digest.FromString(name).Encoded()[:32] + "-" + name
}

func (f *fakeNix) Hold(context.Context, []string) (*nixbuild.Roots, error) { return nil, nil }
func (f *fakeNix) Source() nixbuild.Source {
	s, _ := nixbuild.PathSource("/srv/pkgs")
	return s
}
func (f *fakeNix) CheckTag(tag string) error {
	if tag != "latest" {
		return fmt.Errorf("tag %q: %w", tag, errdefs.ErrNotFound)
	}
	return nil
}
func (f *fakeNix) Tags() []string         { return []string{"latest"} }
func (f *fakeNix) Timeout() time.Duration { return time.Minute }

// pathsDescriber describes a layer by its paths alone, reading nothing.
type pathsDescriber struct{ kind string }

func (pathsDescriber) Finish(context.Context) error { return nil }

func (pathsDescriber) Ahead(context.Context, []*layer.Layer) func() { return func() {} }

func (d pathsDescriber) Key() layer.DescriberKey {
	return layer.DescriberKey{Kind: "test-paths/1" + d.kind, Layers: "test-paths/1" + d.kind}
}
func (pathsDescriber) Describe(_ context.Context, _ digest.Digest, l *layer.Layer) error {
	l.Desc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString(strings.Join(l.Paths, " ")), Size: int64(len(l.Paths))}
	return nil
}

// The ImageBuilder without Nix: what it asks of Nix, what it makes of the
// answer, and what it refuses before asking.
func TestBuilderWithoutNix(t *testing.T) {
	ctx := context.Background()
	nix := &fakeNix{gate: make(chan struct{})}
	b := NewImageBuilder(nix, WithAllow([]string{"htop", "git", "shell"}))

	// Two spellings of one image, asked at once by callers that describe
	// layers apart (so that they share the plan, not the whole build):
	// one Nix build, one image.
	var wg sync.WaitGroup
	imgs := make([]*Image, 2)
	errs := make([]error, 2)
	for i, ref := range []string{"nix.local/git/htop", "nix.local/htop/git"} {
		wg.Add(1)
		go func() { defer wg.Done(); imgs[i], errs[i] = b.Build(ctx, ref, pathsDescriber{kind: ref}) }()
	}
	waitForPlanCallers(t, b, 2)
	close(nix.gate)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := nix.builds.Load(); n != 1 {
		t.Errorf("%d Nix builds for one image", n)
	}
	if imgs[0].Manifest.Digest != imgs[1].Manifest.Digest {
		t.Errorf("one image, two manifests: %s, %s", imgs[0].Manifest.Digest, imgs[1].Manifest.Digest)
	}
	if imgs[0].Ref() != "nix.local/git/htop:latest" || imgs[1].Ref() != "nix.local/htop/git:latest" {
		t.Errorf("refs %s, %s: each caller's own name", imgs[0].Ref(), imgs[1].Ref())
	}
	// Every package Nix returned is in a layer, glibc once, and the top
	// layer is the symlink forest of the packages in image order.
	img := imgs[0]
	var all []string
	for _, l := range img.Layers {
		all = append(all, l.Paths...)
	}
	top := img.Layers[len(img.Layers)-1]
	if !top.Symlinks || !slices.Contains(top.Paths, fakePath("htop")) || !slices.Contains(top.Paths, fakePath("git")) {
		t.Errorf("top layer %+v", top)
	}
	if n := strings.Count(strings.Join(all, " "), fakePath("glibc-2.36")); n != 1 {
		t.Errorf("glibc in %d store-path layers", n)
	}
	for _, pkg := range []string{"cacert", "iana-etc"} {
		if !slices.Contains(all, fakePath(pkg)) {
			t.Errorf("%s not in the image (always added)", pkg)
		}
	}

	// Refused before Nix is asked: a package the allow-list leaves out,
	// a tag that is not served.
	before := nix.builds.Load()
	if _, err := b.Build(ctx, "nix.local/jq", pathsDescriber{}); !errdefs.IsPermissionDenied(err) || !strings.Contains(err.Error(), "jq") {
		t.Errorf("package outside the allow-list: %v", err)
	}
	if _, err := b.Build(ctx, "nix.local/htop:other", pathsDescriber{}); !errdefs.IsNotFound(err) {
		t.Errorf("tag not served: %v", err)
	}
	if n := nix.builds.Load(); n != before {
		t.Errorf("Nix asked %d times for refused requests", n-before)
	}

	// Nix's errors reach the caller as they are.
	nix.fail = &nixbuild.NotFoundError{Packages: []string{"htop"}}
	if _, err := b.Build(ctx, "nix.local/htop", pathsDescriber{}); !errdefs.IsNotFound(err) {
		t.Errorf("missing package: %v", err)
	}
}

// A full queue answers busy at once instead of waiting.
func TestBuilderQueueFull(t *testing.T) {
	nix := &fakeNix{gate: make(chan struct{})}
	defer close(nix.gate)
	b := NewImageBuilder(nix, WithMaxBuilds(1), WithMaxQueued(0))
	go b.Build(context.Background(), "nix.local/htop", pathsDescriber{})
	waitFor(t, func() bool { return nix.builds.Load() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.Build(ctx, "nix.local/git", pathsDescriber{}); !errdefs.IsResourceExhausted(err) {
		t.Errorf("a second image with every slot taken and no queue: %v", err)
	}
}

// Every build waiting for one Nix build sees its log, and then its own
// layers, as they come.
func TestBuilderProgressToEveryCaller(t *testing.T) {
	nix := &fakeNix{gate: make(chan struct{}), log: "building htop"}
	b := NewImageBuilder(nix)
	type watcher struct {
		mu     sync.Mutex
		events []progress.Event
	}
	watch := func(w *watcher) context.Context {
		return progress.WithSink(context.Background(), progress.SinkFunc(func(e progress.Event) {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.events = append(w.events, e)
		}))
	}
	var a, c watcher
	done := make(chan error, 2)
	var layerCount atomic.Int64
	for _, call := range []struct {
		w *watcher
		d layer.Describer
	}{{&a, pathsDescriber{kind: "a"}}, {&c, pathsDescriber{kind: "c"}}} {
		go func() {
			img, err := b.Build(watch(call.w), "nix.local/htop", call.d)
			if err == nil {
				layerCount.Store(int64(len(img.Layers)))
			}
			done <- err
		}()
	}
	waitForPlanCallers(t, b, 2) // both watch the one Nix build
	close(nix.gate)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	for name, w := range map[string]*watcher{"leader": &a, "joined": &c} {
		var nixLines, layers int
		for _, e := range w.events {
			switch {
			case e.Kind == progress.KindNix && e.Text == "building htop":
				nixLines++
			case e.Kind == progress.KindLayer && e.Layer != nil:
				if nixLines == 0 {
					t.Errorf("%s: a layer before Nix's log", name)
				}
				layers++
			}
		}
		if nixLines != 1 || int64(layers) != layerCount.Load() {
			t.Errorf("%s saw %d Nix lines and %d layers of %d: %+v", name, nixLines, layers, layerCount.Load(), w.events)
		}
	}
}

// A caller that leaves stops waiting at once, whether it shares the build
// of another caller or only its Nix build; the others get their image.
func TestBuilderCallerLeaves(t *testing.T) {
	nix := &fakeNix{gate: make(chan struct{})}
	b := NewImageBuilder(nix)
	first := make(chan error, 1)
	go func() {
		_, err := b.Build(context.Background(), "nix.local/htop", pathsDescriber{kind: "a"})
		first <- err
	}()
	waitFor(t, func() bool { return nix.builds.Load() == 1 })
	for _, d := range []layer.Describer{pathsDescriber{kind: "a"}, pathsDescriber{kind: "b"}} {
		ctx, cancel := context.WithCancel(context.Background())
		left := make(chan error, 1)
		go func() {
			_, err := b.Build(ctx, "nix.local/htop", d)
			left <- err
		}()
		if d.(pathsDescriber).kind == "b" {
			waitForPlanCallers(t, b, 2)
		}
		cancel()
		if err := <-left; !errors.Is(err, context.Canceled) {
			t.Errorf("a caller (%s) that left got %v", d.Key().Kind, err)
		}
	}
	close(nix.gate)
	if err := <-first; err != nil {
		t.Errorf("the caller that stayed: %v", err)
	}
	if n := nix.builds.Load(); n != 1 {
		t.Errorf("%d Nix builds", n)
	}
}

// gatedDescriber describes as pathsDescriber once gate is closed, saying
// on entered when it is first asked.
type gatedDescriber struct {
	pathsDescriber
	entered chan struct{}
	once    *sync.Once
	gate    chan struct{}
}

func (d gatedDescriber) Describe(ctx context.Context, parent digest.Digest, l *layer.Layer) error {
	d.once.Do(func() { close(d.entered) })
	<-d.gate
	return d.pathsDescriber.Describe(ctx, parent, l)
}

// A build asked while another still describes the same image's layers
// uses the plan that one holds, when the source cannot change: no second
// Nix build. Of a source that can, it asks Nix again.
func TestBuilderJoinsPlanInUse(t *testing.T) {
	for _, pinned := range []bool{true, false} {
		t.Run(fmt.Sprintf("pinned=%v", pinned), func(t *testing.T) { testJoinsPlanInUse(t, pinned) })
	}
}

func testJoinsPlanInUse(t *testing.T, pinned bool) {
	nix := &fakeNix{}
	b := NewImageBuilder(nix, WithPinnedSource(pinned))
	want := int64(1)
	if !pinned {
		want = 2
	}
	slow := gatedDescriber{pathsDescriber{kind: "slow"}, make(chan struct{}), new(sync.Once), make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := b.Build(context.Background(), "nix.local/htop", slow)
		done <- err
	}()
	<-slow.entered
	if _, err := b.Build(context.Background(), "nix.local/htop", pathsDescriber{kind: "fast"}); err != nil {
		t.Fatal(err)
	}
	close(slow.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := nix.builds.Load(); n != want {
		t.Errorf("%d Nix builds for one image described two ways, one while the other described; want %d", n, want)
	}
	// Once no build holds it, the plan is gone: a later build asks Nix.
	if _, err := b.Build(context.Background(), "nix.local/htop", pathsDescriber{kind: "later"}); err != nil {
		t.Fatal(err)
	}
	if n := nix.builds.Load(); n != want+1 {
		t.Errorf("%d Nix builds after the plan was released, want %d", n, want+1)
	}
}

// A source its configuration leaves unpinned has its images cached when
// something fixes it (Nix.Pin: a store path, a clean work tree's commit):
// a repeated request asks no Nix; one whose pin moved does; an image whose
// pin moved while it was built is not cached under either.
func TestBuilderCachesFixedSource(t *testing.T) {
	ctx := context.Background()
	// Cached images are of store paths that exist.
	nix := &fakeNix{store: t.TempDir()}
	b := NewImageBuilder(nix, WithCache(testutil.Cache(t)))
	for i, step := range []struct {
		pin, movesTo string
		builds       int64
	}{
		{pin: "store:/nix/store/aaaa-nixpkgs", builds: 1},
		{pin: "store:/nix/store/aaaa-nixpkgs", builds: 1},
		{pin: "store:/nix/store/bbbb-nixpkgs", builds: 2},
		{pin: "store:/nix/store/bbbb-nixpkgs", builds: 2},
		{pin: "", builds: 3},
		{pin: "", builds: 4},
		{pin: "git:1111111111111111111111111111111111111111", movesTo: "git:2222222222222222222222222222222222222222", builds: 5},
		{pin: "git:1111111111111111111111111111111111111111", builds: 6},
		{pin: "git:2222222222222222222222222222222222222222", builds: 7},
		{pin: "git:2222222222222222222222222222222222222222", builds: 7},
		{pin: "git:1111111111111111111111111111111111111111", builds: 7},
	} {
		nix.pin.Store(step.pin)
		nix.movesTo.Store(step.movesTo)
		if _, err := b.Build(ctx, "nix.local/htop", pathsDescriber{kind: "fixed"}); err != nil {
			t.Fatal(err)
		}
		if n := nix.builds.Load(); n != step.builds {
			t.Errorf("request %d, pinned by %q: %d Nix builds in all, want %d", i+1, step.pin, n, step.builds)
		}
	}
}

// finishDescriber is a caller's own describer whose Describe waits until
// its caller gives up, and which counts its Finishes.
type finishDescriber struct {
	entered  chan struct{}
	finished atomic.Int64
}

func (d *finishDescriber) Key() layer.DescriberKey {
	return layer.DescriberKey{Kind: "test-finish/1", Layers: "test-paths/1", Scope: fmt.Sprintf("test-%p", d)}
}

func (d *finishDescriber) Describe(ctx context.Context, _ digest.Digest, _ *layer.Layer) error {
	select {
	case d.entered <- struct{}{}:
	default:
	}
	<-ctx.Done()
	return ctx.Err()
}

func (d *finishDescriber) Finish(context.Context) error { d.finished.Add(1); return nil }

func (*finishDescriber) Ahead(context.Context, []*layer.Layer) func() { return func() {} }

// The build finishes its describer, also when it fails; a caller whose
// describing is its own gets Build's answer only once that is done, so
// that nothing the describer started outlives the call.
func TestBuilderFinishesDescriber(t *testing.T) {
	b := NewImageBuilder(&fakeNix{})
	d := &finishDescriber{entered: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	built := make(chan error, 1)
	go func() {
		_, err := b.Build(ctx, "nix.local/htop", d)
		built <- err
	}()
	<-d.entered
	cancel()
	if err := <-built; !errors.Is(err, context.Canceled) {
		t.Fatalf("Build: %v, want context.Canceled", err)
	}
	if n := d.finished.Load(); n != 1 {
		t.Errorf("the describer was finished %d times when Build returned, want 1", n)
	}
	if _, err := b.Build(context.Background(), "nix.local/git", pathsDescriber{}); err != nil {
		t.Fatal(err)
	}

	// Before describing, only Nix's build runs (shared, detached): a
	// caller that leaves then does not wait for it.
	nix := &fakeNix{gate: make(chan struct{})}
	defer close(nix.gate)
	b = NewImageBuilder(nix)
	ctx, cancel = context.WithCancel(context.Background())
	go func() {
		_, err := b.Build(ctx, "nix.local/htop", &finishDescriber{entered: make(chan struct{}, 1)})
		built <- err
	}()
	waitForPlanCallers(t, b, 1)
	cancel()
	if err := <-built; !errors.Is(err, context.Canceled) {
		t.Fatalf("Build left during Nix's build: %v, want context.Canceled", err)
	}
}

// Images run as a user other than root differ from root's only in their
// symlink layer and config, are cached apart, and come back from the cache
// as that user's.
func TestBuilderUser(t *testing.T) {
	ctx := context.Background()
	nix := &fakeNix{store: t.TempDir()}
	nix.pin.Store("store:/nix/store/aaaa-nixpkgs")
	c := testutil.Cache(t)
	alice := tarstream.User{Name: "alice", UID: 1000, GID: 1000}
	rootB := NewImageBuilder(nix, WithCache(c))
	aliceB := NewImageBuilder(nix, WithCache(c), WithUser(alice))

	build := func(b *ImageBuilder) (*Image, ocispec.Image) {
		t.Helper()
		img, err := b.Build(ctx, "nix.local/htop", b.DigestDescriber())
		if err != nil {
			t.Fatal(err)
		}
		var cfg ocispec.Image
		if err := json.Unmarshal(img.Blobs[img.Config.Digest], &cfg); err != nil {
			t.Fatal(err)
		}
		return img, cfg
	}
	rootImg, rootCfg := build(rootB)
	aliceImg, aliceCfg := build(aliceB)
	if n := nix.builds.Load(); n != 2 {
		t.Errorf("%d Nix builds for root's and alice's image; want 2 (not one cached for both)", n)
	}
	if rootCfg.Config.User != "" || slices.ContainsFunc(rootCfg.Config.Env, func(e string) bool { return strings.HasPrefix(e, "HOME=") }) {
		t.Errorf("root's config: %+v", rootCfg.Config)
	}
	if aliceCfg.Config.User != "1000:1000" || !slices.Contains(aliceCfg.Config.Env, "HOME=/home/alice") {
		t.Errorf("alice's config: %+v", aliceCfg.Config)
	}
	if len(rootImg.Layers) != len(aliceImg.Layers) {
		t.Fatalf("%d and %d layers", len(rootImg.Layers), len(aliceImg.Layers))
	}
	top := len(rootImg.Layers) - 1
	for i := range top {
		if rootImg.Layers[i].Desc.Digest != aliceImg.Layers[i].Desc.Digest {
			t.Errorf("store path layer %d differs between root's and alice's image", i)
		}
	}
	rootTop, aliceTop := rootImg.Layers[top].Desc, aliceImg.Layers[top].Desc
	if rootTop.Digest == aliceTop.Digest {
		t.Error("root's and alice's symlink layers are one")
	}
	if _, ok := rootTop.Annotations[labels.UserLabel]; ok || aliceTop.Annotations[labels.UserLabel] != "alice:1000:1000" {
		t.Errorf("user labels: root's %q, alice's %q", rootTop.Annotations[labels.UserLabel], aliceTop.Annotations[labels.UserLabel])
	}
	if rootTop.Annotations[labels.Layer] == aliceTop.Annotations[labels.Layer] {
		t.Error("root's and alice's symlink layers have one content key")
	}

	cached, _ := build(aliceB)
	if n := nix.builds.Load(); n != 2 {
		t.Errorf("alice's pinned image built again (%d builds)", n)
	}
	if cached.Manifest.Digest != aliceImg.Manifest.Digest || cached.Layers[top].User != alice {
		t.Errorf("alice's cached image: manifest %s (want %s), top layer's user %+v", cached.Manifest.Digest, aliceImg.Manifest.Digest, cached.Layers[top].User)
	}
}

// With platforms, a reference is an image index of one image per
// platform, the node's returned; a reference that names its platform is
// that platform's image alone.
func TestBuilderPlatforms(t *testing.T) {
	ctx := context.Background()
	amd64, _ := resolver.ParsePlatform("linux/amd64")
	arm64, _ := resolver.ParsePlatform("linux/arm64")
	b := NewImageBuilder(&fakeNix{store: t.TempDir()}, WithPlatforms([]resolver.Platform{arm64, amd64}))
	img, err := b.Build(ctx, "nix.local/htop", pathsDescriber{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Platform != resolver.HostPlatform() || len(img.Others) != 1 || img.Others[0].Platform == img.Platform {
		t.Fatalf("image for %s with others %v", img.Platform, img.Others)
	}
	if img.Target.MediaType != ocispec.MediaTypeImageIndex || b.TargetType("nix.local/htop") != ocispec.MediaTypeImageIndex {
		t.Errorf("target %+v", img.Target)
	}
	var index ocispec.Index
	if err := json.Unmarshal(img.Blobs[img.Target.Digest], &index); err != nil || digest.FromBytes(img.Blobs[img.Target.Digest]) != img.Target.Digest {
		t.Fatalf("index: %v", err)
	}
	var got []string
	for _, m := range index.Manifests {
		got = append(got, m.Platform.OS+"/"+m.Platform.Architecture)
		var cfg ocispec.Image
		for _, i := range img.Images() {
			if i.Manifest.Digest == m.Digest {
				json.Unmarshal(img.Blobs[i.Config.Digest], &cfg)
			}
		}
		if cfg.Architecture != m.Platform.Architecture {
			t.Errorf("manifest for %s has a config for %q", m.Platform.Architecture, cfg.Architecture)
		}
	}
	if !slices.Equal(got, []string{"linux/arm64", "linux/amd64"}) {
		t.Errorf("index of %v, want the configured order", got)
	}

	// A node whose platform is not listed is refused before anything is
	// built, naming the platforms.
	other := amd64
	if resolver.HostPlatform() == amd64 {
		other = arm64
	}
	only := NewImageBuilder(&fakeNix{}, WithPlatforms([]resolver.Platform{other}))
	parsed, _ := only.Parse("nix.local/htop")
	if err := only.CheckPlatform(parsed); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), other.String()) {
		t.Errorf("a node's platform not listed: %v", err)
	}
	if err := b.CheckPlatform(parsed); err != nil {
		t.Errorf("a listed platform: %v", err)
	}

	one, err := b.Build(ctx, "nix.local/arm64/htop", pathsDescriber{})
	if err != nil {
		t.Fatal(err)
	}
	if one.Target.Digest != one.Manifest.Digest || len(one.Others) != 0 || one.Platform != arm64 {
		t.Errorf("arm64/htop: target %+v, %d others, platform %s", one.Target, len(one.Others), one.Platform)
	}
}
