// Package nixbuild is the Nix prepare step: it looks package attributes up
// in a package set, realises them and reports their runtime closure.
package nixbuild

import (
	"cmp"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/procdir"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild/storepath"
)

//go:embed prepare.nix
var prepareNix []byte

// killedBySignal9 is how Nix reports a builder it killed itself.
const killedBySignal9 = "failed due to signal 9 (Killed)"

// DefaultTimeout bounds one whole prepare step (evaluation and builds).
const DefaultTimeout = 30 * time.Minute

// Request is what to prepare.
type Request struct {
	Packages []string // attribute paths, e.g. "htop", "xorg.xev"
	System   string   // Nix system, e.g. "x86_64-linux"
	Tag      string   // selects the source revision, see Source
}

// Package is one requested attribute and the store paths it realised to.
type Package struct {
	Name string // as requested
	// Outs are the outputs it puts in an image (meta.outputsToInstall, or
	// the output its attribute path names, or its default), in order.
	Outs []string
	// Out is the first of them.
	Out         string
	MainProgram string // meta.mainProgram, if the package sets it
}

// StorePath is one node of the runtime closure graph.
type StorePath struct {
	Path       string   `json:"path"`
	NarHash    string   `json:"narHash"`
	NarSize    int64    `json:"narSize"`
	References []string `json:"references"`
}

// Result is a realised package list and its runtime closure.
type Result struct {
	// Packages in request order; their Outs make the symlink forest.
	Packages []Package
	// Closure holds every store path the packages need at run time, sorted
	// by path, with references sorted.
	Closure []StorePath

	roots *Roots
}

// Release drops the garbage-collector roots that keep the closure alive
// while it is being packed. Call it once the store paths have been read.
func (r *Result) Release() error {
	if r == nil {
		return nil
	}
	return r.roots.Release()
}

// Builder runs the prepare step against one package source.
type Builder struct {
	source    Source
	revisions Revisions
	timeout   time.Duration
	options   map[string]string
	binDir    string
	logLines  int
	workDir   string
	settings  string   // prepare.nix's settings: nixpkgs config and overlays, JSON
	overlays  []string // which evaluation may read
	// procs bounds the Nix processes started to realise paths for holds,
	// however many readers ask at once.
	procs chan struct{}

	writeOnce  sync.Once
	exprPath   string
	writeError error

	store     store
	storeInit storeInit
	caches    *caches

	// beside are the goroutines a build starts beside its evaluation,
	// which Close waits for; none starts once closed (under mu).
	beside sync.WaitGroup
	closed bool
	// versionMu guards nixVersion, asked of Nix until it answers
	// (versionAnswered).
	versionMu       sync.Mutex
	versionAnswered bool
	nixVersion      [2]int // major, minor; zero if unknown

	mu    sync.Mutex
	roots map[string]struct{} // GC root directories not released
}

// Opt configures a Builder.
type Opt func(*Builder)

// WithTimeout bounds a whole Build; zero means DefaultTimeout.
func WithTimeout(d time.Duration) Opt { return func(b *Builder) { b.timeout = d } }

// WithOptions passes Nix settings (`--option NAME VALUE`) to every Nix
// call, e.g. {"substituters": ""} for hosts without a binary cache.
func WithOptions(options map[string]string) Opt {
	return func(b *Builder) { maps.Copy(b.options, options) }
}

// WithBinDir runs Nix's commands from dir instead of looking them up in PATH.
func WithBinDir(dir string) Opt { return func(b *Builder) { b.binDir = dir } }

// WithLogTail sets how many of Nix's last log lines a BuildError carries.
func WithLogTail(lines int) Opt { return func(b *Builder) { b.logLines = lines } }

// WithRevisions sets the tags served (path.Match patterns, such as
// "nixos-*" or a commit id); DefaultRevisions if none.
func WithRevisions(patterns []string) Opt {
	return func(b *Builder) {
		if len(patterns) > 0 {
			b.revisions = slices.Clone(patterns)
		}
	}
}

// WithWorkDir keeps the Builder's files (prepare.nix) in this process's
// directory below dir (procdir; root's alone), which the next process
// removes if this one is killed. Without it, in a private temporary
// directory.
func WithWorkDir(dir string) Opt { return func(b *Builder) { b.workDir = dir } }

// WithNixpkgsConfig passes config (nixpkgs' config attribute set, e.g.
// {"allowUnfree": true}) and overlays (paths of Nix files) to the package
// set, as data: JSON and paths, never spliced into Nix code. Evaluation
// may read the overlays.
func WithNixpkgsConfig(config map[string]any, overlays []string) Opt {
	return func(b *Builder) {
		settings := map[string]any{}
		if len(config) > 0 {
			settings["config"] = config
		}
		if len(overlays) > 0 {
			settings["overlays"] = overlays
		}
		s, _ := json.Marshal(settings)
		b.settings = string(s)
		b.overlays = overlays
	}
}

// maxHoldProcs bounds the Nix processes realising paths for holds.
const maxHoldProcs = 4

// New returns a Builder for source.
func New(source Source, opts ...Opt) *Builder {
	b := &Builder{source: source, revisions: DefaultRevisions, options: map[string]string{}, logLines: 30, settings: "{}",
		roots: map[string]struct{}{}, procs: make(chan struct{}, maxHoldProcs)}
	b.store.b = b
	for _, opt := range opts {
		opt(b)
	}
	if b.timeout <= 0 {
		b.timeout = DefaultTimeout
	}
	b.caches = newCaches(b.options)
	if _, set := b.options["fallback"]; !set && b.caches.configured() {
		// Where the operator names binary caches, a substitute that
		// cannot be fetched is built instead: a cache only saves work.
		b.options["fallback"] = "true"
	}
	return b
}

// Source is the package source this Builder reads.
func (b *Builder) Source() Source { return b.source }

// Pin says what fixes the package set for tag where the source's
// configuration does not (Source.Pinned): its store path, or the commit
// of a clean git work tree; "" when it may change unseen. It runs no Nix.
func (b *Builder) Pin(ctx context.Context, tag string) string {
	return b.source.pin(ctx, tag, os.Getenv("NIX_PATH"), storepath.DefaultDir)
}

// Timeout bounds one Build.
func (b *Builder) Timeout() time.Duration { return b.timeout }

// CheckTag refuses a tag that is not one of the revisions served, as a
// not-found error: before anything is fetched or evaluated.
func (b *Builder) CheckTag(tag string) error { return b.revisions.check(tag) }

// Tags lists the tags served that can be listed (not patterns), sorted.
func (b *Builder) Tags() []string { return b.revisions.tags() }

// Build realises the requested packages and returns their closure. Missing
// attributes are reported all at once as a *NotFoundError; failures of Nix
// as a *BuildError carrying the end of Nix's log. The caller must Release
// the result.
func (b *Builder) Build(ctx context.Context, req Request) (*Result, error) {
	if len(req.Packages) == 0 {
		return nil, fmt.Errorf("no packages requested: %w", errdefs.ErrInvalidArgument)
	}
	if err := b.CheckTag(req.Tag); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeoutCause(ctx, b.timeout, fmt.Errorf("nix prepare step exceeded its timeout of %s: %w", b.timeout, context.DeadlineExceeded))
	defer cancel()
	b.caches.check(ctx)
	res, err := b.build(ctx, req)
	if err != nil && ctx.Err() != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%w)", cause, err)
		}
	}
	return res, err
}

// evaluation is what prepare.nix's `result` says.
type evaluation struct {
	Missing     []string           `json:"missing"`
	NotPackages []string           `json:"notPackages"`
	Refused     []string           `json:"refused"`
	Packages    []evaluatedPackage `json:"packages"`
}

type evaluatedPackage struct {
	Name        string   `json:"name"`
	Outs        []string `json:"outs"`
	MainProgram string   `json:"mainProgram"`
}

// build evaluates the request read-only (nothing is written to the store
// for packages that are there), then makes the packages GC roots as they
// are or, when some are missing, builds them with nix-build: evaluation,
// build and roots in one Nix process, so that no derivation is ever
// unrooted between them for a concurrent `nix-store --gc` to take.
func (b *Builder) build(ctx context.Context, req Request) (_ *Result, retErr error) {
	expr, err := b.expression()
	if err != nil {
		return nil, err
	}
	src, release, err := b.fetch(ctx, expr, req.Tag)
	if err != nil {
		return nil, err
	}
	defer release()
	// What comes after the evaluation needs Nix's version (asked once, for
	// the closure query) and the serve process (for the roots): started
	// beside the evaluation rather than after it.
	b.mu.Lock()
	if !b.closed {
		b.beside.Go(func() { b.pathInfoFormat(ctx) })
		b.beside.Go(func() { b.store.warm(ctx) })
	}
	b.mu.Unlock()
	ev, err := b.evaluate(ctx, src, expr, req)
	if err != nil {
		return nil, err
	}

	res := &Result{}
	if res.roots, err = b.newRoots(); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			res.Release()
		}
	}()
	outs, err := res.addPackages(ev.found.Packages)
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		if err := b.realise(ctx, res.roots.dir, ev, outs); err != nil {
			return nil, err
		}
		res.Closure, err = b.closure(ctx, outs)
		if err == nil || attempt == realiseAttempts || !collected(err) || ctx.Err() != nil {
			return res, err
		}
		// Nix 2.8's collector can take paths a build running beside it
		// just made, roots and all (NixOS/nix#6757): build them again.
		log.G(ctx).WithError(err).Warn("Nix's garbage collector took packages just built: building them again")
	}
}

// realiseAttempts bounds how often packages are built again because a
// collection running beside the build took them.
const realiseAttempts = 3

// realise makes outs valid and GC roots in dir: rooted through Nix when
// they are in the store, else built (or substituted) by nix-build.
func (b *Builder) realise(ctx context.Context, dir string, ev evaluated, outs []string) error {
	rooted, err := b.rootIfValid(ctx, dir, outs)
	if err != nil || rooted {
		return err
	}
	return b.realisePackages(ctx, dir, ev.env, ev.args, outs)
}

// collected reports whether err says store paths asked about were not
// valid: collected between being made and being read.
func collected(err error) bool {
	var be *BuildError
	return errors.As(err, &be) && be.Stage == "query" && (strings.Contains(be.Log, "is not valid") || strings.Contains(be.Err.Error(), "is not valid"))
}

// evaluated is a request's packages as the package set has them, and how
// it was asked (which realising them and asking why it refuses some reuse).
type evaluated struct {
	found evaluation
	env   []string
	args  []string
}

// evaluate looks req's packages up in the package set src, read-only:
// those it lacks, those that are no packages and those it refuses are
// errors naming every one of them.
func (b *Builder) evaluate(ctx context.Context, src Source, expr string, req Request) (evaluated, error) {
	source, err := src.argument(req.Tag)
	if err != nil {
		return evaluated{}, err
	}
	pkgJSON, err := json.Marshal(req.Packages)
	if err != nil {
		return evaluated{}, err
	}
	if v := b.version(ctx); src.kind == "flake" && v != [2]int{} && !atLeast(v, flakesSince) {
		return evaluated{}, fmt.Errorf("the package source is a flake, which needs Nix %d.%d or newer; this node's Nix is %d.%d: %w",
			flakesSince[0], flakesSince[1], v[0], v[1], errdefs.ErrFailedPrecondition)
	}
	ev := evaluated{env: b.evalEnv(src, req.Tag)}
	ev.args, err = b.evalArgs(src, expr, req.Tag,
		"--argstr", "source", source,
		"--argstr", "packages", string(pkgJSON),
		"--argstr", "system", req.System,
		"--argstr", "settings", b.settings)
	if err != nil {
		return evaluated{}, err
	}
	log.G(ctx).WithFields(log.Fields{"packages": req.Packages, "system": req.System, "source": b.source.String()}).Info("evaluating packages")
	out, err := b.runEnv(ctx, ev.env, "evaluate", "nix-instantiate", append([]string{"--eval", "--strict", "--json", "-A", "result"}, ev.args...)...)
	var be *BuildError
	if lookup := b.source.lookup(); errors.As(err, &be) && lookup != "" && strings.Contains(be.Log, "'"+lookup+"' was not found in the Nix search path") {
		return evaluated{}, &NoSourceError{Lookup: lookup}
	}
	if errors.As(err, &be) && src.kind == "flake" && strings.Contains(be.Log, "forbidden in restricted mode") {
		return evaluated{}, fmt.Errorf("%w\n(the flake's inputs are fetched by an evaluation restricted to what it may read: allow their URIs with [nix.options] allowed-uris, e.g. \"github:\" or \"git+https://\")", err)
	}
	if errors.As(err, &be) && src.kind == "flake" && req.Tag != "" && req.Tag != LatestTag && isNoRevision(be.Log) {
		// Evaluation fetches a flake (builtins.getFlake).
		return evaluated{}, &RevisionError{Source: src.String(), Tag: req.Tag, Reason: nixMessage(be.Log), Err: err}
	}
	if err != nil {
		return evaluated{}, err
	}
	if err := json.Unmarshal(out, &ev.found); err != nil {
		return evaluated{}, &BuildError{Stage: "evaluate", Err: fmt.Errorf("reading evaluation result: %w", err)}
	}
	switch found := ev.found; {
	case len(found.Missing) > 0:
		return evaluated{}, &NotFoundError{Packages: found.Missing}
	case len(found.NotPackages) > 0:
		return evaluated{}, &NotPackageError{Attributes: found.NotPackages}
	case len(found.Refused) > 0:
		return evaluated{}, b.refusal(ctx, ev.env, ev.args, found.Refused)
	}
	return ev, nil
}

// addPackages adds the packages evaluation found to res, checking that
// their outputs are store paths, and returns those outputs, sorted.
func (res *Result) addPackages(found []evaluatedPackage) ([]string, error) {
	var outs []string
	for _, p := range found {
		if len(p.Outs) == 0 {
			return nil, &BuildError{Stage: "evaluate", Err: fmt.Errorf("package %s has none of the outputs it says to install", p.Name)}
		}
		if err := storepath.CheckAll(p.Outs); err != nil {
			return nil, &BuildError{Stage: "evaluate", Err: fmt.Errorf("package %s: %w", p.Name, err)}
		}
		res.Packages = append(res.Packages, Package{Name: p.Name, Outs: p.Outs, Out: p.Outs[0], MainProgram: p.MainProgram})
		outs = append(outs, p.Outs...)
	}
	return slices.Compact(slices.Sorted(slices.Values(outs))), nil
}

// closure is the closure of outs, every path with its references and NAR
// hash and size.
func (b *Builder) closure(ctx context.Context, outs []string) ([]StorePath, error) {
	query := append([]string{"--extra-experimental-features", "nix-command", "path-info", "--json"}, b.pathInfoFormat(ctx)...)
	info, err := b.run(ctx, "query", "nix", b.args(append(append(query, "--recursive", "--"), outs...)...)...)
	if err != nil {
		return nil, err
	}
	closure, err := parsePathInfo(info)
	if err != nil {
		return nil, &BuildError{Stage: "query", Err: err}
	}
	return closure, nil
}

// refusal asks the package set why it refuses each of packages (one
// evaluation each: Nix's message is only in its log).
func (b *Builder) refusal(ctx context.Context, env, eval []string, packages []string) error {
	refused := &RefusedError{Packages: packages, Reasons: map[string]string{}}
	for _, p := range packages {
		_, err := b.runEnv(ctx, env, "evaluate", "nix-instantiate", append(append([]string{"--eval", "-A", "explanation"}, eval...), "--argstr", "explain", p)...)
		var be *BuildError
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &be):
			refused.Reasons[p] = nixMessage(be.Log)
		default:
			refused.Reasons[p] = "refused (no reason given)"
		}
	}
	return refused
}

// nixMessage is the message of the last error in a Nix log, without the
// trace that leads to it and Nix's hint about --show-trace. (Nix 2.8
// starts it with "error: MESSAGE"; later ones with "error:", the trace,
// then an indented "error: MESSAGE".)
func nixMessage(log string) string {
	lines := strings.Split(log, "\n")
	start := -1
	for i, l := range lines {
		if t := strings.TrimSpace(l); strings.HasPrefix(t, "error:") && strings.TrimSpace(strings.TrimPrefix(t, "error:")) != "" {
			start = i
		}
	}
	if start < 0 {
		return strings.TrimSpace(log)
	}
	var msg []string
	for _, l := range lines[start:] {
		if strings.HasPrefix(strings.TrimSpace(l), "(use '--show-trace'") {
			break
		}
		msg = append(msg, strings.TrimSpace(l))
	}
	return strings.TrimSpace(strings.TrimPrefix(strings.Join(msg, "\n"), "error:"))
}

// rootIfValid makes outs GC roots in dir if every one is valid already.
func (b *Builder) rootIfValid(ctx context.Context, dir string, outs []string) (bool, error) {
	valid, held, release, err := b.store.tempRoots(ctx, outs)
	if err != nil {
		return false, err
	}
	defer release()
	if len(valid) < len(outs) {
		return false, nil
	}
	if err := b.rootValid(ctx, dir, outs, valid); err != nil {
		return false, err
	}
	return held(), nil
}

// realisePackages builds (or substitutes) the requested packages with
// nix-build, which roots them in dir itself.
func (b *Builder) realisePackages(ctx context.Context, dir string, env, eval, outs []string) error {
	log.G(ctx).WithField("packages", len(outs)).Info("realising packages")
	build := append([]string{"--out-link", filepath.Join(dir, "out"), "-A", "derivations"}, eval...)
	built, err := b.runEnv(ctx, env, "build", "nix-build", build...)
	if err != nil {
		var be *BuildError
		if !errors.As(err, &be) || !strings.Contains(be.Log, killedBySignal9) || ctx.Err() != nil {
			return err
		}
		// Nix 2.8 was seen here failing builders "due to signal 9" at
		// random, without any OOM report: it kills a builder's process
		// group once its log pipe closes, which can race the builder's
		// own exit. Once more; a real kill fails again and is reported.
		log.G(ctx).WithError(err).Warn("builder killed by signal 9, retrying once")
		if built, err = b.runEnv(ctx, env, "build", "nix-build", build...); err != nil {
			return err
		}
	}
	lines := strings.Fields(string(built))
	for _, o := range outs {
		if !slices.Contains(lines, o) {
			// The second evaluation (nix-build's) found other packages.
			return fmt.Errorf("the package source changed while %s was being built: try again: %w", o, errdefs.ErrAborted)
		}
	}
	return nil
}

// fetch returns the package source for tag as evaluation reads it: the
// configured one, or for one fetched from a URL the store path Nix fetched
// it to (a path source), held until release is called. Fetching evaluates
// only prepare.nix's `sourceTree`, with the URL as data, unrestricted; the
// package set is then evaluated restricted to the fetched tree.
func (b *Builder) fetch(ctx context.Context, expr, tag string) (_ Source, release func(), _ error) {
	if !b.source.fetchedFrom(tag) {
		return b.source, func() {}, nil
	}
	arg, err := b.source.argument(tag)
	if err != nil {
		return Source{}, nil, err
	}
	log.G(ctx).WithField("source", b.source.String()).Info("fetching the package source")
	for attempt := 0; ; attempt++ {
		out, err := b.runEnv(ctx, b.evalEnv(b.source, tag), "fetch", "nix-instantiate",
			b.args("--eval", "--read-write-mode", "--json", "-A", "sourceTree", expr, "--argstr", "source", arg)...)
		var be *BuildError
		if errors.As(err, &be) && tag != "" && tag != LatestTag && isNoRevision(be.Log) {
			return Source{}, nil, &RevisionError{Source: b.source.String(), Tag: tag, Reason: nixMessage(be.Log), Err: err}
		}
		if err != nil {
			return Source{}, nil, err
		}
		var tree string
		if err := json.Unmarshal(out, &tree); err != nil {
			return Source{}, nil, &BuildError{Stage: "fetch", Err: fmt.Errorf("reading the fetched source: %w", err)}
		}
		if err := storepath.Check(tree); err != nil {
			return Source{}, nil, &BuildError{Stage: "fetch", Err: err}
		}
		roots, err := b.Hold(ctx, []string{tree})
		if errdefs.IsNotFound(err) && attempt == 0 {
			// Collected between the fetch and the hold: fetch again.
			continue
		}
		if err != nil {
			return Source{}, nil, err
		}
		return Source{kind: "path", loc: tree}, func() { roots.Release() }, nil
	}
}

// evalArgs are the arguments of a command that evaluates prepare.nix for
// src (configured or fetched) at tag, followed by args. Evaluation is
// restricted (restrict-eval): it may read prepare.nix, the package source,
// the Nix search path and the source's URL, and nothing else of the host.
func (b *Builder) evalArgs(src Source, expr, tag string, args ...string) ([]string, error) {
	paths, uris, err := src.access(tag)
	if err != nil {
		return nil, err
	}
	restrict := []string{"--option", "restrict-eval", "true"}
	if src.kind == "flake" {
		// Flakes are experimental in every Nix: enabled for this call
		// only, not for the node.
		restrict = append(restrict, "--option", "extra-experimental-features", "nix-command flakes")
	}
	if op := b.options["allowed-uris"]; op != "" {
		uris = append([]string{op}, uris...)
	}
	if len(uris) > 0 {
		restrict = append(restrict, "--option", "allowed-uris", strings.Join(uris, " "))
	}
	restrict = append(restrict, "-I", "nixery-prepare="+filepath.Dir(expr))
	for _, p := range paths {
		restrict = append(restrict, "-I", "nixery-source="+p)
	}
	for i, p := range b.overlays {
		restrict = append(restrict, "-I", fmt.Sprintf("nixery-overlay-%d=%s", i, p))
	}
	return b.args(append(append(restrict, expr), args...)...), nil
}

// evalEnv is the environment of a command that evaluates: this process's,
// with no Nix search path but the entry a `<name>` source needs.
func (b *Builder) evalEnv(src Source, tag string) []string {
	env := slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "NIX_PATH=") })
	if p := src.searchPath(tag, os.Getenv("NIX_PATH")); p != "" {
		env = append(env, "NIX_PATH="+p)
	}
	return env
}

// args puts the configured Nix settings before args; later settings (the
// restrictions of evalArgs) override them.
func (b *Builder) args(args ...string) []string {
	options := maps.Clone(b.options)
	maps.Copy(options, b.caches.settings()) // without the caches that are down
	var opts []string
	for _, k := range slices.Sorted(maps.Keys(options)) {
		opts = append(opts, "--option", k, options[k])
	}
	return append(opts, args...)
}

func (b *Builder) bin(name string) string {
	if b.binDir != "" {
		return filepath.Join(b.binDir, name)
	}
	return name
}

// expression writes prepare.nix to a private temporary file once per Builder.
func (b *Builder) expression() (string, error) {
	b.writeOnce.Do(func() {
		b.writeError = func() error {
			parent := ""
			if b.workDir != "" {
				own, err := procdir.Open(b.workDir, nil)
				if err != nil {
					return err
				}
				parent = own.Path()
			}
			dir, err := os.MkdirTemp(parent, "nixery-prepare-")
			if err != nil {
				return err
			}
			b.exprPath = filepath.Join(dir, "prepare.nix")
			return os.WriteFile(b.exprPath, prepareNix, 0o400)
		}()
		if b.writeError != nil {
			b.writeError = fmt.Errorf("writing prepare.nix: %w", b.writeError)
		}
	})
	return b.exprPath, b.writeError
}

// Close ends the Builder's Nix processes and removes its files and the GC
// roots of results not released yet (a daemon that stops keeps no store
// path alive).
func (b *Builder) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.beside.Wait()
	b.store.stop()
	b.mu.Lock()
	var errs []error
	for dir := range b.roots {
		errs = append(errs, os.RemoveAll(dir))
	}
	clear(b.roots)
	b.mu.Unlock()
	if b.exprPath != "" {
		errs = append(errs, os.RemoveAll(filepath.Dir(b.exprPath)))
	}
	return errors.Join(errs...)
}

// parsePathInfo reads `nix path-info --json` in each of its shapes: a list
// of objects with a "path" field (Nix up to 2.18); an object keyed by
// store path (2.19 on, and --json-format 1); and, from --json-format 2
// on, {"version": N, "storeDir": DIR, "info": {...}} keyed by path name
// without the store directory, references too.
func parsePathInfo(data []byte) ([]StorePath, error) {
	var list []StorePath
	if err := json.Unmarshal(data, &list); err == nil {
		return checkPathInfo(list)
	}
	var versioned struct {
		Version  int                   `json:"version"`
		StoreDir string                `json:"storeDir"`
		Info     map[string]*StorePath `json:"info"`
	}
	if err := json.Unmarshal(data, &versioned); err == nil && versioned.Version >= 2 && versioned.Info != nil {
		dir := versioned.StoreDir
		if dir == "" {
			dir = storepath.DefaultDir
		}
		for name, sp := range versioned.Info {
			if sp == nil {
				return nil, fmt.Errorf("nix path-info: %s is not valid", name)
			}
			sp.Path = dir + "/" + name
			for i, r := range sp.References {
				sp.References[i] = dir + "/" + r
			}
			list = append(list, *sp)
		}
		return checkPathInfo(list)
	}
	var byPath map[string]*StorePath
	if err := json.Unmarshal(data, &byPath); err != nil {
		return nil, fmt.Errorf("reading nix path-info output: %w", err)
	}
	for path, sp := range byPath {
		if sp == nil {
			return nil, fmt.Errorf("nix path-info: %s is not valid", path)
		}
		sp.Path = path
		list = append(list, *sp)
	}
	return checkPathInfo(list)
}

// checkPathInfo checks the paths of a closure (they name what layers
// hold) and sorts it.
func checkPathInfo(list []StorePath) ([]StorePath, error) {
	for i := range list {
		if list[i].Path == "" {
			return nil, fmt.Errorf("nix path-info: entry %d has no path", i)
		}
		if err := storepath.CheckAll(append([]string{list[i].Path}, list[i].References...)); err != nil {
			return nil, fmt.Errorf("nix path-info: %w", err)
		}
		list[i].References = slices.Sorted(slices.Values(list[i].References))
	}
	slices.SortFunc(list, func(a, b StorePath) int { return cmp.Compare(a.Path, b.Path) })
	return list, nil
}

// jsonFormatSince is the first Nix whose path-info takes --json-format
// (and warns without it); earlier ones refuse it.
var jsonFormatSince = [2]int{2, 33}

// versionTimeout bounds `nix --version`, which runs detached from the
// build that asked first: every later build waits for its answer.
const versionTimeout = time.Minute

// pathInfoFormat is what to add to `nix path-info --json` for this
// Builder's Nix: --json-format 2 where Nix knows it.
func (b *Builder) pathInfoFormat(ctx context.Context) []string {
	if atLeast(b.version(ctx), jsonFormatSince) {
		return []string{"--json-format", "2"}
	}
	return nil
}

// flakesSince is the first Nix with flakes (experimental in every one).
var flakesSince = [2]int{2, 4}

// version is this Builder's Nix's version (major, minor), zero if unknown:
// asked once it answers, and again by the next caller while it does not
// (Nix may be installed or mounted after the daemon starts).
func (b *Builder) version(ctx context.Context) [2]int {
	b.versionMu.Lock()
	defer b.versionMu.Unlock()
	if b.versionAnswered {
		return b.nixVersion
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), versionTimeout)
	defer cancel()
	if out, err := b.run(ctx, "query", "nix", "--version"); err == nil {
		b.versionAnswered = true
		b.nixVersion, _ = parseNixVersion(string(out))
	}
	return b.nixVersion
}

// Warm does, in the background, what the first build would wait for
// before its evaluation: opening the store and asking Nix's version. A
// daemon calls it as it starts, so that its first request (a node's first
// pod) does not pay for them; what fails here is tried again by that
// request, which reports it.
func (b *Builder) Warm(ctx context.Context) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.beside.Go(func() {
		b.storeInit.open(ctx, b)
		b.version(ctx)
	})
}

// atLeast reports whether version have is want or later.
func atLeast(have, want [2]int) bool {
	return have[0] > want[0] || have[0] == want[0] && have[1] >= want[1]
}

// parseNixVersion reads `nix --version` ("nix (Nix) 2.26.3").
func parseNixVersion(s string) ([2]int, bool) {
	fields := strings.Fields(s)
	if len(fields) == 0 {
		return [2]int{}, false
	}
	var v [2]int
	if _, err := fmt.Sscanf(fields[len(fields)-1], "%d.%d", &v[0], &v[1]); err != nil {
		return [2]int{}, false
	}
	return v, true
}
