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
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

//go:embed prepare.nix
var prepareNix []byte

// killedBySignal9 is how Nix reports a builder it killed itself.
const killedBySignal9 = "failed due to signal 9 (Killed)"

// errDerivationsCollected says derivations were gone when realised.
var errDerivationsCollected = errors.New("derivations deleted between evaluation and build")

// DefaultTimeout bounds one whole prepare step (evaluation and builds).
const DefaultTimeout = 30 * time.Minute

// Request is what to prepare.
type Request struct {
	Packages []string // attribute paths, e.g. "htop", "xorg.xev"
	System   string   // Nix system, e.g. "x86_64-linux"
	Tag      string   // selects the source revision, see Source
}

// Package is one requested attribute and the store path it realised to.
type Package struct {
	Name        string // as requested
	Out         string // realised store path
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
	// Packages in request order; their Out paths make the symlink forest.
	Packages []Package
	// Closure holds every store path the packages need at run time, sorted
	// by path, with references sorted.
	Closure []StorePath

	rootDir string
	owner   *Builder
}

// Release drops the garbage-collector roots that keep the closure alive
// while it is being packed. Call it once the store paths have been read.
func (r *Result) Release() error {
	if r == nil || r.rootDir == "" {
		return nil
	}
	if r.owner != nil {
		r.owner.mu.Lock()
		delete(r.owner.roots, r.rootDir)
		r.owner.mu.Unlock()
	}
	return os.RemoveAll(r.rootDir)
}

// Hold makes paths that another process realised GC roots of this one,
// until the result is released. Through Nix, which tells a collection
// already running to keep them too. A path that is gone already is an
// error naming it.
func (b *Builder) Hold(ctx context.Context, paths []string) (*Result, error) {
	res, err := b.newResult()
	if err != nil {
		return nil, err
	}
	dir := res.rootDir
	hold := append([]string{"--realise", "--add-root", filepath.Join(dir, "held")}, paths...)
	if _, err := b.run(ctx, "hold", "nix-store", b.args(hold...)...); err != nil {
		res.Release()
		for _, p := range paths {
			if _, serr := os.Lstat(p); serr != nil {
				return nil, fmt.Errorf("store path %s is gone (garbage-collected?): %w", p, errdefs.ErrNotFound)
			}
		}
		return nil, err
	}
	return res, nil
}

// Builder runs the prepare step against one package source.
type Builder struct {
	source   Source
	timeout  time.Duration
	options  map[string]string
	binDir   string
	logLines int
	progress func(line string)

	writeOnce  sync.Once
	exprPath   string
	writeError error

	mu    sync.Mutex
	roots map[string]struct{} // GC root directories of results not released
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

// WithProgress receives every line Nix writes to stderr (build logs).
func WithProgress(f func(line string)) Opt { return func(b *Builder) { b.progress = f } }

// WithLogTail sets how many of Nix's last log lines a BuildError carries.
func WithLogTail(lines int) Opt { return func(b *Builder) { b.logLines = lines } }

// New returns a Builder for source.
func New(source Source, opts ...Opt) *Builder {
	b := &Builder{source: source, options: map[string]string{}, logLines: 30, roots: map[string]struct{}{}}
	for _, opt := range opts {
		opt(b)
	}
	if b.timeout <= 0 {
		b.timeout = DefaultTimeout
	}
	return b
}

// Source is the package source this Builder reads.
func (b *Builder) Source() Source { return b.source }

// Build realises the requested packages and returns their closure. Missing
// attributes are reported all at once as a *NotFoundError; failures of Nix
// as a *BuildError carrying the end of Nix's log. The caller must Release
// the result.
func (b *Builder) Build(ctx context.Context, req Request) (*Result, error) {
	if len(req.Packages) == 0 {
		return nil, fmt.Errorf("no packages requested: %w", errdefs.ErrInvalidArgument)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, b.timeout, fmt.Errorf("nix prepare step exceeded its timeout of %s: %w", b.timeout, context.DeadlineExceeded))
	defer cancel()
	res, err := b.build(ctx, req)
	if errors.Is(err, errDerivationsCollected) {
		// Evaluation wrote the derivations, and a `nix-store --gc` running
		// since before they had roots deleted them. Now their roots exist
		// for any collection that starts later.
		log.G(ctx).WithError(err).Warn("derivations were garbage-collected before their build: evaluating again")
		res, err = b.build(ctx, req)
	}
	if err != nil && ctx.Err() != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%w)", cause, err)
		}
	}
	return res, err
}

func (b *Builder) build(ctx context.Context, req Request) (_ *Result, retErr error) {
	expr, err := b.expression()
	if err != nil {
		return nil, err
	}
	source, err := b.source.argument(req.Tag)
	if err != nil {
		return nil, err
	}
	pkgJSON, err := json.Marshal(req.Packages)
	if err != nil {
		return nil, err
	}
	log.G(ctx).WithFields(log.Fields{"packages": req.Packages, "system": req.System, "source": b.source.String()}).Info("evaluating packages")

	// --read-write-mode lets evaluation write the .drv files it computes,
	// so that they can be realised below.
	out, err := b.run(ctx, "evaluate", "nix-instantiate", b.args("--eval", "--strict", "--json", "--read-write-mode", expr,
		"--argstr", "source", source,
		"--argstr", "packages", string(pkgJSON),
		"--argstr", "system", req.System)...)
	if err != nil {
		return nil, err
	}
	var eval struct {
		Missing     []string `json:"missing"`
		NotPackages []string `json:"notPackages"`
		Packages    []struct {
			Name        string `json:"name"`
			Drv         string `json:"drv"`
			Out         string `json:"out"`
			MainProgram string `json:"mainProgram"`
		} `json:"packages"`
	}
	if err := json.Unmarshal(out, &eval); err != nil {
		return nil, &BuildError{Stage: "evaluate", Err: fmt.Errorf("reading evaluation result: %w", err)}
	}
	if len(eval.Missing) > 0 {
		return nil, &NotFoundError{Packages: eval.Missing}
	}
	if len(eval.NotPackages) > 0 {
		return nil, &NotPackageError{Attributes: eval.NotPackages}
	}

	// GC roots keep the derivations until they are built, and the packages
	// (and so their closures) until the caller has packed them, from a
	// concurrent `nix-store --gc`.
	res, err := b.newResult()
	if err != nil {
		return nil, err
	}
	rootDir := res.rootDir
	defer func() {
		if retErr != nil {
			res.Release()
		}
	}()
	var drvs, outs []string
	for _, p := range eval.Packages {
		res.Packages = append(res.Packages, Package{Name: p.Name, Out: p.Out, MainProgram: p.MainProgram})
		drvs = append(drvs, p.Drv)
		outs = append(outs, p.Out)
	}
	slices.Sort(drvs)
	drvs = slices.Compact(drvs)
	for _, drv := range drvs {
		if err := os.Symlink(drv, filepath.Join(rootDir, "drv-"+filepath.Base(drv))); err != nil {
			return nil, fmt.Errorf("GC root for %s: %w", drv, err)
		}
	}

	log.G(ctx).WithField("derivations", len(drvs)).Info("realising packages")
	realise := append([]string{"--realise", "--add-root", filepath.Join(rootDir, "root")}, drvs...)
	if _, err := b.run(ctx, "build", "nix-store", b.args(realise...)...); err != nil {
		for _, drv := range drvs {
			if _, serr := os.Lstat(drv); errors.Is(serr, fs.ErrNotExist) {
				return nil, fmt.Errorf("%s: %w (%w)", drv, errDerivationsCollected, err)
			}
		}
		var be *BuildError
		if !errors.As(err, &be) || !strings.Contains(be.Log, killedBySignal9) || ctx.Err() != nil {
			return nil, err
		}
		// Nix 2.8 was seen here failing builders "due to signal 9" at
		// random, without any OOM report: it kills a builder's process
		// group once its log pipe closes, which can race the builder's
		// own exit. Once more; a real kill fails again and is reported.
		log.G(ctx).WithError(err).Warn("builder killed by signal 9, retrying once")
		if _, err := b.run(ctx, "build", "nix-store", b.args(realise...)...); err != nil {
			return nil, err
		}
	}

	info, err := b.run(ctx, "query", "nix", b.args(append([]string{
		"--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive"}, outs...)...)...)
	if err != nil {
		return nil, err
	}
	res.Closure, err = parsePathInfo(info)
	if err != nil {
		return nil, &BuildError{Stage: "query", Err: err}
	}
	return res, nil
}

// gcRootsDir is where Nix looks for GC roots; build roots go below it.
const gcRootsDir = "/nix/var/nix/gcroots"

// gcRootDir makes a directory for one build's GC roots: below Nix's gcroots
// directory, where every symlink into the store is a root, or, where that
// is not writable (another Nix state directory), a temporary one whose
// roots only `--add-root` registers.
//
// A directory is named after the process that made it; those of processes
// that are gone (killed mid-build) are removed here, so that their roots do
// not keep store paths forever.
func gcRootDir() (string, error) {
	parent := filepath.Join(gcRootsDir, "nixery-builds")
	if err := os.MkdirAll(parent, 0o755); err == nil {
		sweepGCRoots(parent)
		if dir, err := os.MkdirTemp(parent, fmt.Sprintf("build-%d-", os.Getpid())); err == nil {
			return dir, nil
		}
	}
	dir, err := os.MkdirTemp("", "nixery-gcroots-")
	if err != nil {
		return "", fmt.Errorf("creating GC root directory: %w", err)
	}
	return dir, nil
}

// sweepGCRoots removes the root directories of processes that are gone.
func sweepGCRoots(parent string) {
	entries, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "build-%d-", &pid); err != nil || pid <= 0 {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			_ = os.RemoveAll(filepath.Join(parent, e.Name()))
		}
	}
}

func (b *Builder) args(args ...string) []string {
	var opts []string
	for _, k := range slices.Sorted(maps.Keys(b.options)) {
		opts = append(opts, "--option", k, b.options[k])
	}
	return append(opts, args...)
}

// expression writes prepare.nix to a private temporary file once per Builder.
func (b *Builder) expression() (string, error) {
	b.writeOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nixery-prepare-")
		if err != nil {
			b.writeError = fmt.Errorf("writing prepare.nix: %w", err)
			return
		}
		b.exprPath = filepath.Join(dir, "prepare.nix")
		if err := os.WriteFile(b.exprPath, prepareNix, 0o400); err != nil {
			b.writeError = fmt.Errorf("writing prepare.nix: %w", err)
		}
	})
	return b.exprPath, b.writeError
}

// Close removes the Builder's temporary files.
// newResult makes a result with a directory for its GC roots, which Close
// removes if the result is not released by then.
func (b *Builder) newResult() (*Result, error) {
	dir, err := gcRootDir()
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.roots[dir] = struct{}{}
	b.mu.Unlock()
	return &Result{rootDir: dir, owner: b}, nil
}

// Close removes the Builder's files, and the GC roots of results not
// released yet (a daemon that stops keeps no store path alive).
func (b *Builder) Close() error {
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

// parsePathInfo reads `nix path-info --json`: a list of objects with a
// "path" field up to Nix 2.18, an object keyed by path since 2.19.
func parsePathInfo(data []byte) ([]StorePath, error) {
	var list []StorePath
	if err := json.Unmarshal(data, &list); err != nil {
		var byPath map[string]*StorePath
		if err2 := json.Unmarshal(data, &byPath); err2 != nil {
			return nil, fmt.Errorf("reading nix path-info output: %w", err)
		}
		for path, sp := range byPath {
			if sp == nil {
				return nil, fmt.Errorf("nix path-info: %s is not valid", path)
			}
			sp.Path = path
			list = append(list, *sp)
		}
	}
	for i := range list {
		if list[i].Path == "" {
			return nil, fmt.Errorf("nix path-info: entry %d has no path", i)
		}
		list[i].References = slices.Sorted(slices.Values(list[i].References))
	}
	slices.SortFunc(list, func(a, b StorePath) int { return cmp.Compare(a.Path, b.Path) })
	return list, nil
}

// Realise makes store paths present, by substitution from the configured
// binary caches or by building their derivers.
func (b *Builder) Realise(ctx context.Context, paths []string) error {
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	_, err := b.run(ctx, "realise", "nix-store", b.args(append([]string{"--realise"}, paths...)...)...)
	return err
}
