package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/cache"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/snapshot"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
	"github.com/nixery-snapshotter/nixery-snapshotter/tarstream"
)

// DefaultMaxLayers is the most layers an image gets, the symlink layer included.
const DefaultMaxLayers = layering.DefaultBudget + 1

// DefaultMaxBuilds is how many different images are built at once.
const DefaultMaxBuilds = 2

// DefaultMaxQueued is how many builds of different images may wait.
const DefaultMaxQueued = 64

// Image is a built image, ready to be registered or served.
type Image struct {
	resolver.Image
	Manifest ocispec.Descriptor
	Config   ocispec.Descriptor
	Layers   []*layer.Layer
	// Blobs holds manifest, config and in-memory layers by digest, and
	// an index's and its other images' manifests, configs and in-memory
	// layers.
	Blobs map[digest.Digest][]byte
	// Target is what the reference names: Manifest, or an image index
	// ([image] platforms) of this image and Others, those of the other
	// platforms.
	Target ocispec.Descriptor
	Others []*Image
}

// Chain is the chain ID of the image's layers: its top snapshot's name.
func (img *Image) Chain() digest.Digest {
	var chain digest.Digest
	for _, l := range img.Layers {
		chain = layer.ChainID(chain, l.Desc.Digest)
	}
	return chain
}

// unpacked is what containerd's unpacker reads of the image: the
// manifest's layers and the config's diff IDs.
func (img *Image) unpacked() ([]ocispec.Descriptor, []digest.Digest, error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(img.Blobs[img.Manifest.Digest], &m); err != nil {
		return nil, nil, fmt.Errorf("manifest of %s: %w", img.Ref(), err)
	}
	var c ocispec.Image
	if err := json.Unmarshal(img.Blobs[img.Config.Digest], &c); err != nil {
		return nil, nil, fmt.Errorf("config of %s: %w", img.Ref(), err)
	}
	return m.Layers, c.RootFS.DiffIDs, nil
}

// Paths are the store paths of the image's layers.
func (img *Image) Paths() []string {
	var paths []string
	for _, l := range img.Layers {
		paths = append(paths, l.Paths...)
	}
	return paths
}

// Images are img and the other images of its index, if it has one.
func (img *Image) Images() []*Image { return append([]*Image{img}, img.Others...) }

// Nix is what the ImageBuilder needs of Nix: the prepare step of one package
// source (a *nixbuild.Builder).
type Nix interface {
	// Build realises packages and returns their closure, held until the
	// result is released.
	Build(ctx context.Context, req nixbuild.Request) (*nixbuild.Result, error)
	// Hold keeps store paths from the garbage collector until released.
	Hold(ctx context.Context, paths []string) (*nixbuild.Roots, error)
	Source() nixbuild.Source
	// Pin says what fixes the package set of tag where the source's
	// configuration does not (a store path, a clean work tree's commit),
	// without Nix; "" when it may change unseen.
	Pin(ctx context.Context, tag string) string
	// CheckTag refuses a tag that is not a revision served; Tags lists
	// those that are.
	CheckTag(tag string) error
	Tags() []string
	Timeout() time.Duration
}

// ImageBuilder turns image references into images: the reference's packages
// are realised by Nix, grouped into layers and described.
type ImageBuilder struct {
	nix       Nix
	host      string
	maxLayers int
	sem       chan struct{}
	flight    singleflight.Group
	plansMu   sync.Mutex
	plans     map[string]*planCall
	cache     *cache.Cache
	claims    *snapshot.Claims
	layering  []layering.Opt
	// layeringID is layering's identity (layering.Identity), part of
	// cached images' keys: computed once, as a popularity file can be
	// large.
	layeringID string
	allow      []string
	maxQueued  int64
	queued     atomic.Int64
	// watchers of the builds under way, by flight and by plan: everyone
	// waiting for a build sees its progress.
	watchers progress.Shared

	pinnedSource bool
	user         tarstream.User
	pusher       Pusher
	platforms    []resolver.Platform
}

// Pusher takes the closures of built images to where other nodes find
// them (a *push.Pusher); it must not wait for them to get there.
type Pusher interface {
	Push(ctx context.Context, paths []string)
}

// noPusher keeps closures on this node.
type noPusher struct{}

func (noPusher) Push(context.Context, []string) {}

// WithPusher hands the packages of every image Nix built to p.
func WithPusher(p Pusher) BuildOpt { return func(b *ImageBuilder) { b.pusher = p } }

// BuildOpt configures an ImageBuilder.
type BuildOpt func(*ImageBuilder)

// WithHost sets the registry host of references (default nix.local).
func WithHost(host string) BuildOpt { return func(b *ImageBuilder) { b.host = host } }

// WithMaxLayers bounds the layers of an image, the symlink layer included.
func WithMaxLayers(n int) BuildOpt { return func(b *ImageBuilder) { b.maxLayers = n } }

// WithMaxBuilds bounds how many different images are built at once.
func WithMaxBuilds(n int) BuildOpt {
	return func(b *ImageBuilder) { b.sem = make(chan struct{}, max(1, n)) }
}

// WithLayering passes options (algorithm, popularity) to the grouping.
func WithLayering(opts ...layering.Opt) BuildOpt {
	return func(b *ImageBuilder) { b.layering = append(b.layering, opts...) }
}

// WithAllow restricts the packages a reference may ask for to those
// matching one of patterns (path.Match syntax, e.g. "python3Packages.*");
// nil allows all.
func WithAllow(patterns []string) BuildOpt { return func(b *ImageBuilder) { b.allow = patterns } }

// WithMaxQueued bounds how many builds of different images wait for a
// build slot; more are refused as busy instead of piling up.
func WithMaxQueued(n int) BuildOpt { return func(b *ImageBuilder) { b.maxQueued = int64(n) } }

// WithClaims records the layers of the images built, so that the nix
// snapshotter and later pulls believe their labels (snapshot.Claims).
func WithClaims(c *snapshot.Claims) BuildOpt { return func(b *ImageBuilder) { b.claims = c } }

// WithUser makes images run as u (default root): their symlink layer holds
// u's accounts and home, their config names u.
func WithUser(u tarstream.User) BuildOpt { return func(b *ImageBuilder) { b.user = u } }

// User is whom the ImageBuilder's images run as.
func (b *ImageBuilder) User() tarstream.User { return b.user }

// WithPlatforms makes references that name no platform image indexes of
// one image per platform (default: an image of the node's platform).
func WithPlatforms(platforms []resolver.Platform) BuildOpt {
	return func(b *ImageBuilder) { b.platforms = platforms }
}

// WithCache remembers layer descriptors (and images of pinned sources) in c.
func WithCache(c *cache.Cache) BuildOpt { return func(b *ImageBuilder) { b.cache = c } }

// WithPinnedSource treats the package source as pinned whatever the tag
// (a path whose content the operator controls): its images are cached, and
// a repeated request starts no Nix.
func WithPinnedSource(on bool) BuildOpt { return func(b *ImageBuilder) { b.pinnedSource = on } }

// pinned reports whether img's images are cached: its source is pinned.
func (b *ImageBuilder) pinned(img resolver.Image) bool {
	return b.cache != nil && b.sourcePinned(img)
}

// pin is what fixes the package set of img where its configuration does
// not (Nix.Pin), "" where it does or nothing does.
func (b *ImageBuilder) pin(ctx context.Context, img resolver.Image) string {
	if b.cache == nil || b.sourcePinned(img) {
		return ""
	}
	return b.nix.Pin(ctx, img.Tag)
}

// sourcePinned reports whether the source of img cannot change.
func (b *ImageBuilder) sourcePinned(img resolver.Image) bool {
	return b.pinnedSource || b.nix.Source().Pinned(img.Tag)
}

// cachedImage returns the remembered image for key if every store path it
// holds is still present and every layer still describes as recorded.
func (b *ImageBuilder) cachedImage(ctx context.Context, key cache.ImageKey, img resolver.Image, describe layer.Describer) (*Image, bool) {
	rec, ok := b.cache.Image(key)
	if !ok {
		return nil, false
	}
	built := &Image{Image: img, Manifest: rec.Manifest, Target: rec.Manifest, Config: rec.Config, Blobs: map[digest.Digest][]byte{
		rec.Manifest.Digest: rec.ManifestBytes, rec.Config.Digest: rec.ConfigBytes,
	}}
	var recorded []ocispec.Descriptor
	for _, rl := range rec.Layers {
		for _, p := range rl.Paths {
			if _, err := os.Lstat(p); err != nil {
				log.G(ctx).WithField("path", p).Info("cached image needs a store path that is gone: building")
				return nil, false
			}
		}
		l := &layer.Layer{Paths: rl.Paths, Hashes: rl.Hashes, Symlinks: rl.Symlinks}
		if rl.Symlinks {
			l.User = b.user // the key says it is the record's
		}
		built.Layers = append(built.Layers, l)
		recorded = append(recorded, rl.Desc)
	}
	progress.Step(ctx, "%s: cached (pinned package source)", img.Ref())
	if err := describeLayers(ctx, img, built.Layers, describe, recorded); err != nil {
		log.G(ctx).WithError(err).Info("cached image no longer matches its layers: building")
		return nil, false
	}
	for i, l := range built.Layers {
		l.Desc = recorded[i] // with the image's annotations
		if l.Blob != nil {
			built.Blobs[l.Desc.Digest] = l.Blob
		}
	}
	return built, true
}

// errNotAsRecorded says a layer described otherwise than its record.
var errNotAsRecorded = errors.New("the layer is not as recorded")

// describeLayers describes layers in order, base first, each on the chain
// of those below it, and shows each. With recorded descriptors, a layer
// that describes otherwise stops it (errNotAsRecorded).
func describeLayers(ctx context.Context, img resolver.Image, layers []*layer.Layer, describe layer.Describer, recorded []ocispec.Descriptor) error {
	defer describe.Ahead(ctx, layers)()
	var chain digest.Digest
	for i, l := range layers {
		if err := describe.Describe(ctx, chain, l); err != nil {
			return fmt.Errorf("layer %d of %s: %w", i+1, img.Ref(), err)
		}
		if recorded != nil && l.Desc.Digest != recorded[i].Digest {
			return fmt.Errorf("layer %d of %s is %s, recorded as %s: %w", i+1, img.Ref(), l.Desc.Digest, recorded[i].Digest, errNotAsRecorded)
		}
		chain = layer.ChainID(chain, l.Desc.Digest)
		layerMade(ctx, img, i, len(layers), l)
	}
	return nil
}

// NewImageBuilder returns an ImageBuilder that realises packages with nix.
func NewImageBuilder(nix Nix, opts ...BuildOpt) *ImageBuilder {
	b := &ImageBuilder{nix: nix, host: resolver.DefaultHost, maxLayers: DefaultMaxLayers, maxQueued: DefaultMaxQueued, plans: map[string]*planCall{}, pusher: noPusher{}}
	WithMaxBuilds(DefaultMaxBuilds)(b)
	for _, opt := range opts {
		opt(b)
	}
	b.layeringID = layering.Identity(b.layering...)
	return b
}

// Nix is the prepare step the ImageBuilder asks.
func (b *ImageBuilder) Nix() Nix { return b.nix }

// Host is the image host of the references the ImageBuilder builds.
func (b *ImageBuilder) Host() string { return b.host }

// DigestDescriber describes tar layers by their digests alone, storing
// nothing (each read once, then remembered in the ImageBuilder's cache).
func (b *ImageBuilder) DigestDescriber() layer.Describer { return layer.Digests(b.cache) }

// Parse reads a reference as this ImageBuilder does, allow-list and served
// revisions included.
func (b *ImageBuilder) Parse(ref string) (resolver.Image, error) {
	img, err := b.ParseName(ref)
	if err != nil {
		return img, err
	}
	return img, b.nix.CheckTag(img.Tag)
}

// ParseName reads a reference, allow-list included, whatever its tag.
func (b *ImageBuilder) ParseName(ref string) (resolver.Image, error) {
	img, err := resolver.Parse(ref, resolver.WithHost(b.host))
	if err != nil || b.allow == nil {
		return img, err
	}
	var denied []string
	for _, p := range img.Requested {
		if !slices.ContainsFunc(b.allow, func(pattern string) bool {
			ok, _ := path.Match(pattern, p)
			return ok
		}) {
			denied = append(denied, p)
		}
	}
	if len(denied) > 0 {
		return img, fmt.Errorf("packages not allowed on this node: %v: %w", denied, errdefs.ErrPermissionDenied)
	}
	return img, nil
}

// describing is a build's Describer, which says whether the build has
// begun to describe layers.
type describing struct {
	layer.Describer
	started atomic.Bool
}

func (d *describing) Describe(ctx context.Context, parent digest.Digest, l *layer.Layer) error {
	d.started.Store(true)
	return d.Describer.Describe(ctx, parent, l)
}

// Build builds the image for ref. Concurrent calls for the same image (in
// whatever spelling: `git/htop` is `htop/git`) share one Nix build, and
// those that describe layers alike one description of each layer;
// describe decides how layers are described, and the build that
// describes them finishes them (Describer.Finish), whether it succeeded or
// not, before the image is returned. Every caller sees the progress of
// the build it waits for (progress.Shared). The image's store
// paths are kept from Nix's garbage collector while Build runs: callers
// that read them later make them roots of their own (nixbuild.Hold), or
// rely on those of whatever holds them (snapshots).
//
// With [image] platforms, a reference that names no platform is the image
// index of one image per platform: the one of img's platform (the node's)
// is returned, described by describe, the others (Others) by their
// digests alone; Target is the index.
func (b *ImageBuilder) Build(ctx context.Context, ref string, describe layer.Describer) (*Image, error) {
	if b.maxLayers < 2 {
		return nil, fmt.Errorf("max layers %d: need at least 2 (store paths and symlinks): %w", b.maxLayers, errdefs.ErrInvalidArgument)
	}
	img, err := b.Parse(ref)
	if err != nil {
		return nil, err
	}
	if !b.indexes(img) {
		return b.buildImage(ctx, img, describe)
	}
	var mine *Image
	var all []*Image
	for _, p := range b.platforms {
		pimg, d := img, b.DigestDescriber()
		pimg.Platform = p
		if p == img.Platform {
			d = describe
		}
		built, err := b.buildImage(ctx, pimg, d)
		if err != nil {
			return nil, fmt.Errorf("%s for %s: %w", img.Ref(), p, err)
		}
		if p == img.Platform {
			mine = built
		}
		all = append(all, built)
	}
	if mine == nil {
		mine = all[0] // not this node's platform: for others to pull
	}
	return newIndex(mine, all)
}

// indexes reports whether img is an image index (Build).
func (b *ImageBuilder) indexes(img resolver.Image) bool {
	return len(b.platforms) > 0 && !img.PlatformNamed
}

// Platforms are the platforms of the ImageBuilder's image indexes, as
// configured ("linux/amd64,linux/arm64"), or "" when it makes images of
// one platform.
func (b *ImageBuilder) Platforms() string { return resolver.JoinPlatforms(b.platforms) }

// CheckPlatform refuses, before anything is built, a reference whose
// image index would have no image for img's platform (this node's).
func (b *ImageBuilder) CheckPlatform(img resolver.Image) error {
	if b.indexes(img) && !slices.Contains(b.platforms, img.Platform) {
		return fmt.Errorf("%s: [image] platforms (%s) has no image for this node's platform %s: add it there: %w", img.Ref(), b.Platforms(), img.Platform, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// TargetType is the media type of what Build makes of ref: an image
// manifest, or an image index.
func (b *ImageBuilder) TargetType(ref string) string {
	if img, err := b.Parse(ref); err == nil && b.indexes(img) {
		return ocispec.MediaTypeImageIndex
	}
	return ocispec.MediaTypeImageManifest
}

// buildImage builds img for its platform (Build, without an index).
func (b *ImageBuilder) buildImage(ctx context.Context, img resolver.Image, describe layer.Describer) (*Image, error) {
	key := fmt.Sprintf("%s %s %s/%s", img.Platform.NixSystem, img.Tag, strings.Join(img.Packages, " "), strings.Join(img.Requested, " "))
	dk := describe.Key()
	described := key + " " + dk.Kind
	// Shared only by builds that would store the same things in the same
	// place: describers and namespaces alike.
	ns, _ := namespaces.Namespace(ctx)
	flight := fmt.Sprintf("%s %q %q", described, ns, dk.Scope)
	shared, leave := b.watchers.Join(ctx, "flight "+flight)
	defer leave()
	flown := &describing{Describer: describe}
	done := b.flight.DoChan(flight, func() (any, error) {
		// The shared work stays joinable, its progress to whoever waits,
		// after the caller that started it left.
		_, hold := b.watchers.Join(context.Background(), "flight "+flight)
		defer hold()
		built, hit, err := b.build(shared, img, key, flown)
		return flightResult{built, hit}, err
	})
	var res flightResult
	var err error
	select {
	case r := <-done:
		err = r.Err
		res, _ = r.Val.(flightResult)
	case <-ctx.Done():
		// This caller left; the build goes on for any others. Describing
		// of its own (its scope) ends with it: once that has begun, wait
		// for it, so that nothing it started outlives the call. (Before,
		// only Nix's build runs, which others may share.)
		if dk.Scope != "" && flown.started.Load() {
			<-done
		}
		err = ctx.Err()
	}
	if errors.Is(err, context.Canceled) && ctx.Err() == nil {
		// The client whose request led the shared build went away, not
		// this one's: build again.
		leave()
		return b.buildImage(ctx, img, describe)
	}
	result := buildResult(err)
	if res.cached {
		result = "cached"
	}
	buildsTotal.WithLabelValues(result).Inc()
	if err != nil {
		return nil, err
	}
	if err := b.claim(res.img); err != nil {
		return nil, err
	}
	built := *res.img
	built.Image = img // the caller's own name for it
	return &built, nil
}

// flightResult is what a shared build gives each of its callers.
type flightResult struct {
	img    *Image
	cached bool
}

// build builds img, the work Build shares: from the cache when its source
// is pinned, else from its plan (prepare), its layers described by
// describe. hit says the image came from the cache.
func (b *ImageBuilder) build(ctx context.Context, img resolver.Image, key string, describe layer.Describer) (_ *Image, hit bool, _ error) {
	dk := describe.Key()
	// Work stored for this caller alone stops when it leaves; work that
	// others may share goes on without it.
	work := context.WithoutCancel(ctx)
	if dk.Scope != "" {
		work = ctx
	}
	start := time.Now()
	defer func() { buildSeconds.Observe(time.Since(start).Seconds()) }()
	// A source that cannot change (its configuration says so, or it is a
	// store path or a clean work tree's commit) has its images cached.
	pin := b.pin(work, img)
	pinned := b.pinned(img) || pin != ""
	ikey := cache.ImageKey{Source: b.nix.Source().String(), Pin: pin, System: img.Platform.NixSystem, Tag: img.Tag,
		Packages: img.Packages, Requested: img.Requested, Layers: dk.Layers, MaxLayers: b.maxLayers,
		Layering: b.layeringID, User: b.user.Key()}
	// What describing started is over, and what it found held, before
	// the image is registered or given up, and before the store paths
	// the plan holds are released: unpacks under way read them.
	finished := false
	finish := func(err error) error {
		finished = true
		if ferr := describe.Finish(work); err == nil {
			err = ferr
		}
		return err
	}
	defer func() {
		if !finished {
			_ = finish(nil) // failed before describing ended
		}
	}()
	if pinned {
		if cached, ok := b.cachedImage(work, ikey, img, describe); ok {
			return cached, true, finish(nil)
		}
	}
	if err := work.Err(); err != nil {
		return nil, false, err // the caller left while the cache was tried
	}
	p, release, err := b.prepare(work, img, key)
	if err != nil {
		return nil, false, err
	}
	defer release()
	built, err := b.describe(work, img, p, describe)
	err = finish(err)
	// Not what a pin that moved meanwhile (a channel updated, a file
	// edited) would name: Nix may have read either.
	if err == nil && pinned && b.pin(work, img) == pin {
		if err := b.cache.PutImage(ikey, imageRecord(built)); err != nil {
			log.G(ctx).WithError(err).Warn("caching image")
		}
	}
	return built, false, err
}

// claim records the layers of img as made by this node, each as the layer
// of its chain.
func (b *ImageBuilder) claim(img *Image) error {
	if b.claims == nil {
		return nil
	}
	var chain digest.Digest
	for _, l := range img.Layers {
		chain = layer.ChainID(chain, l.Desc.Digest)
		if err := b.claims.Record(l.Desc.Annotations, chain.String()); err != nil {
			return err
		}
	}
	return nil
}

// plan is an image realised by Nix and grouped into layers, not yet
// described.
type plan struct {
	packages []nixbuild.Package
	layers   []*layer.Layer
	res      *nixbuild.Result
}

// planCall is one preparation of a plan and the builds that wait for it.
type planCall struct {
	done chan struct{}
	plan *plan
	err  error
	refs int // builds that read the plan's store paths
}

// prepare evaluates, realises and groups img, or joins a preparation of it
// under way, whatever the builds that share it describe. The plan's store
// paths are GC roots until the last of them calls release.
func (b *ImageBuilder) prepare(ctx context.Context, img resolver.Image, key string) (*plan, func(), error) {
	// Watching before waiting: a build that joins sees what comes next.
	ctx, leave := b.watchers.Join(ctx, "plan "+key)
	b.plansMu.Lock()
	c, joined := b.plans[key]
	if joined {
		c.refs++
	} else {
		c = &planCall{done: make(chan struct{}), refs: 1}
		b.plans[key] = c
	}
	b.plansMu.Unlock()
	// A plan of a pinned source stays to be joined while builds hold it
	// (they describe its layers): a build of the same image asked
	// meanwhile, described another way, needs no Nix of its own. A plan of
	// a source that may change is joined only while Nix makes it, so that
	// a request after it sees the source as it is then.
	keep := b.sourcePinned(img)
	release := sync.OnceFunc(func() {
		b.plansMu.Lock()
		defer b.plansMu.Unlock()
		if c.refs--; c.refs == 0 {
			if b.plans[key] == c {
				delete(b.plans, key)
			}
			if c.plan != nil {
				c.plan.res.Release()
			}
		}
	})
	if !joined {
		c.plan, c.err = b.queuedPlan(ctx, img)
		if c.err != nil || !keep {
			b.plansMu.Lock()
			if b.plans[key] == c {
				delete(b.plans, key) // the next build asks Nix again
			}
			b.plansMu.Unlock()
		}
		close(c.done)
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		// This build left; the plan goes on for any others.
		leave()
		release()
		return nil, nil, ctx.Err()
	}
	leave() // what comes next (describing) is each build's own
	if c.err != nil {
		release()
		return nil, nil, c.err
	}
	return c.plan, release, nil
}

// queuedPlan makes img's plan once a build slot is free.
func (b *ImageBuilder) queuedPlan(ctx context.Context, img resolver.Image) (*plan, error) {
	if b.queued.Add(1) > b.maxQueued+int64(cap(b.sem)) {
		b.queued.Add(-1)
		return nil, fmt.Errorf("%d image builds are running or waiting: try again later: %w", b.maxQueued+int64(cap(b.sem)), errdefs.ErrResourceExhausted)
	}
	defer b.queued.Add(-1)
	if err := ctx.Err(); err != nil {
		return nil, err // a free slot must not win over a caller gone
	}
	select {
	case b.sem <- struct{}{}:
		defer func() { <-b.sem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	// Shared by every build: not cancelled with the first of them.
	ctx = log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("ref", img.Ref()))
	start := time.Now()
	progress.Step(ctx, "%s: packages %v for %s", img.Ref(), img.Packages, img.Platform.NixSystem)
	res, err := b.nix.Build(ctx, nixbuild.Request{Packages: img.Packages, System: img.Platform.NixSystem, Tag: img.Tag})
	if err != nil {
		return nil, fmt.Errorf("build %s: %w", img.Ref(), err)
	}

	var roots []string
	var closureSize int64
	for _, pkg := range res.Packages {
		roots = append(roots, pkg.Outs...)
	}
	b.pusher.Push(ctx, roots)
	for _, sp := range res.Closure {
		closureSize += sp.NarSize
	}
	groups, err := layering.Group(roots, res.Closure, append(slices.Clone(b.layering), layering.WithBudget(b.maxLayers-1))...)
	if err != nil {
		res.Release()
		return nil, fmt.Errorf("group layers of %s: %w", img.Ref(), err)
	}
	progress.Step(ctx, "%s: closure of %d store paths, %s, in %d layers + symlinks (built in %s)",
		img.Ref(), len(res.Closure), progress.Bytes(closureSize), len(groups), time.Since(start).Round(time.Millisecond))

	narHash := map[string]string{}
	for _, sp := range res.Closure {
		narHash[sp.Path] = sp.NarHash
	}
	hashes := func(paths []string) []string {
		out := make([]string, len(paths))
		for i, p := range paths {
			out[i] = narHash[p]
		}
		return out
	}
	p := &plan{packages: res.Packages, res: res}
	for _, g := range groups {
		p.layers = append(p.layers, &layer.Layer{Paths: g.Paths, Hashes: hashes(g.Paths)})
	}
	p.layers = append(p.layers, &layer.Layer{Paths: roots, Hashes: hashes(roots), Symlinks: true, User: b.user})
	return p, nil
}

// describe describes the layers of plan p in order, base first, and makes
// the image.
func (b *ImageBuilder) describe(ctx context.Context, img resolver.Image, p *plan, describe layer.Describer) (*Image, error) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("ref", img.Ref()))
	layers := make([]*layer.Layer, len(p.layers))
	for i, pl := range p.layers {
		l := *pl // the plan's layers are shared, their descriptors are not
		layers[i] = &l
	}
	if err := describeLayers(ctx, img, layers, describe, nil); err != nil {
		return nil, err
	}
	return newImage(img, imageConfig(img, p.packages, b.user), layers)
}

// layerMade sends the progress event of the index-th of count layers of img.
func layerMade(ctx context.Context, img resolver.Image, index, count int, l *layer.Layer) {
	e := progress.Layer{Index: index + 1, Count: count, Digest: l.Desc.Digest.String(), Size: l.Desc.Size}
	text := fmt.Sprintf("%s: layer %d/%d %s %s", img.Ref(), e.Index, count, l.Desc.Digest.Encoded()[:12], progress.Bytes(l.Desc.Size))
	if l.Symlinks {
		text += " (symlinks)"
	} else {
		e.Paths = len(l.Paths)
		text += fmt.Sprintf(" (%d store paths)", e.Paths)
	}
	progress.Send(ctx, progress.Event{Kind: progress.KindLayer, Text: text, Layer: &e})
}

// imageRecord is the cache's record of img.
func imageRecord(img *Image) cache.Image {
	rec := cache.Image{
		Manifest: img.Manifest, ManifestBytes: img.Blobs[img.Manifest.Digest],
		Config: img.Config, ConfigBytes: img.Blobs[img.Config.Digest],
	}
	for _, l := range img.Layers {
		rec.Layers = append(rec.Layers, cache.Layer{Desc: l.Desc, LayerKey: l.CacheKey()})
	}
	return rec
}
