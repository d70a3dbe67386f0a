// Package layering groups a runtime closure into image layers. It is pure:
// the same graph always gives the same layers in the same order.
package layering

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"gonum.org/v1/gonum/graph/simple"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// DefaultBudget is how many store-path layers an image gets at most:
// Nixery's budget, which leaves room under the 125-layer limit of overlay
// mounts for the symlink layer and for layers users add on top.
const DefaultBudget = 93

// Algorithm names a way of grouping.
type Algorithm string

const (
	// Nixery is Nixery's dominator-tree grouping, with its defects fixed.
	Nixery Algorithm = "nixery"
	// AutoLayer is the size-first grouping of nixpkgs' dockerTools.
	AutoLayer Algorithm = "auto"
)

// DefaultAlgorithm is chosen by the layer-reuse benchmark (README): it
// stores the fewest bytes for a sequence of different images.
const DefaultAlgorithm = AutoLayer

// PathGroup is a group of store paths that go into one image layer.
type PathGroup struct {
	Paths []string // sorted
	Size  int64    // sum of the paths' NAR sizes
}

type options struct {
	budget     int
	algorithm  Algorithm
	popularity map[string]int
}

// Opt adjusts Group.
type Opt func(*options)

// WithBudget sets the most layers Group returns (at least 1).
func WithBudget(n int) Opt { return func(o *options) { o.budget = n } }

// WithAlgorithm chooses the grouping (default DefaultAlgorithm).
func WithAlgorithm(a Algorithm) Opt { return func(o *options) { o.algorithm = a } }

// WithPopularity gives the Nixery algorithm how many packages of a package
// set need each store path, by name without its hash (Nixery's popularity
// file). Without it, being needed by several paths of the closure counts.
func WithPopularity(p map[string]int) Opt { return func(o *options) { o.popularity = p } }

func applied(opts []Opt) options {
	o := options{budget: DefaultBudget, algorithm: DefaultAlgorithm}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// Identity says what opts make Group do, as a value that is equal exactly
// when they group alike (a cached image is keyed by it): the budget, the
// algorithm, and the popularity data by digest.
func Identity(opts ...Opt) string {
	o := applied(opts)
	id := fmt.Sprintf("%s budget=%d", o.algorithm, o.budget)
	if o.popularity != nil {
		b, _ := json.Marshal(o.popularity) // keys sorted: the same map, the same bytes
		id += " popularity=" + digest.FromBytes(b).String()
	}
	return id
}

// Group splits the closure of roots into layers with the chosen algorithm.
// Layers come base first: by the height of their paths in the reference
// graph (libc and data-only packages like cacert at 0, what is built on
// them above), then larger first, then by path. Snapshots are keyed by the
// chain of layers below them, so a common prefix is what another image
// reuses, and a path's height — unlike how much one image shares it — is
// the same in every image.
func Group(roots []string, closure []nixbuild.StorePath, opts ...Opt) ([]PathGroup, error) {
	o := applied(opts)
	if o.budget < 1 {
		return nil, fmt.Errorf("layer budget %d: must be at least 1: %w", o.budget, errdefs.ErrInvalidArgument)
	}
	if len(closure) == 0 {
		return nil, nil
	}
	g, err := newGraph(roots, closure)
	if err != nil {
		return nil, err
	}
	var groups [][]int64
	switch o.algorithm {
	case Nixery:
		groups = g.nixery(o.budget, o.popularity)
	case AutoLayer:
		groups = g.autoLayer(o.budget)
	default:
		return nil, fmt.Errorf("layering algorithm %q: want %q or %q: %w", o.algorithm, Nixery, AutoLayer, errdefs.ErrInvalidArgument)
	}
	return g.order(groups, o.budget), nil
}

// graph is a closure with node IDs in sorted path order (1..n; 0 is the
// image root, whose edges lead to the requested packages), so everything
// downstream is independent of the order the closure arrived in.
type graph struct {
	*simple.DirectedGraph
	paths    []nixbuild.StorePath // by ID-1
	roots    []int64
	succ     [][]int64 // references by node, as slices: gonum's maps are slow to walk
	inDegree []int     // references from other store paths

	mark       []uint32 // for reach: visited in generation
	generation uint32
}

const rootID = 0

func newGraph(roots []string, closure []nixbuild.StorePath) (*graph, error) {
	sorted := slices.Clone(closure)
	slices.SortFunc(sorted, func(a, b nixbuild.StorePath) int { return cmp.Compare(a.Path, b.Path) })
	id := make(map[string]int64, len(sorted))
	for i, sp := range sorted {
		if _, dup := id[sp.Path]; dup {
			return nil, fmt.Errorf("store path %s listed twice: %w", sp.Path, errdefs.ErrInvalidArgument)
		}
		id[sp.Path] = int64(i + 1)
	}
	g := &graph{DirectedGraph: simple.NewDirectedGraph(), paths: sorted, succ: make([][]int64, len(sorted)+1),
		inDegree: make([]int, len(sorted)+1)}
	g.AddNode(simple.Node(rootID))
	for i := range sorted {
		g.AddNode(simple.Node(int64(i + 1)))
	}
	for _, sp := range sorted {
		from := id[sp.Path]
		for _, ref := range sp.References {
			to, ok := id[ref]
			if !ok {
				return nil, fmt.Errorf("%s references %s, which is not in the closure: %w", sp.Path, ref, errdefs.ErrInvalidArgument)
			}
			if to == from || g.HasEdgeFromTo(from, to) {
				continue
			}
			g.SetEdge(simple.Edge{F: simple.Node(from), T: simple.Node(to)})
			g.succ[from] = append(g.succ[from], to)
			g.inDegree[to]++
		}
	}
	for _, r := range roots {
		to, ok := id[r]
		if !ok {
			return nil, fmt.Errorf("package %s is not in its closure: %w", r, errdefs.ErrInvalidArgument)
		}
		if !g.HasEdgeFromTo(rootID, to) {
			g.SetEdge(simple.Edge{F: simple.Node(rootID), T: simple.Node(to)})
			g.succ[rootID] = append(g.succ[rootID], to)
			g.roots = append(g.roots, to)
		}
	}
	slices.Sort(g.roots)
	g.mark = make([]uint32, len(sorted)+1)
	unreached := len(sorted) + 1 - len(g.reach(rootID))
	if unreached > 0 {
		return nil, fmt.Errorf("%d of %d store paths are not needed by any package: %w", unreached, len(sorted), errdefs.ErrInvalidArgument)
	}
	return g, nil
}

// topoOrder sorts all nodes so that every node comes before those it
// refers to (Kahn's algorithm); false if there is a cycle.
func (g *graph) topoOrder() ([]int64, bool) {
	in := make([]int, len(g.succ))
	for _, cs := range g.succ {
		for _, c := range cs {
			in[c]++
		}
	}
	order := make([]int64, 0, len(g.succ))
	for n := range in {
		if in[n] == 0 {
			order = append(order, int64(n))
		}
	}
	for i := 0; i < len(order); i++ {
		for _, c := range g.succ[order[i]] {
			if in[c]--; in[c] == 0 {
				order = append(order, c)
			}
		}
	}
	return order, len(order) == len(g.succ)
}

// reach lists the nodes reachable from n, n included.
func (g *graph) reach(n int64) []int64 {
	g.generation++
	gen := g.generation
	g.mark[n] = gen
	out := []int64{n}
	for i := 0; i < len(out); i++ {
		for _, c := range g.succ[out[i]] {
			if g.mark[c] != gen {
				g.mark[c] = gen
				out = append(out, c)
			}
		}
	}
	return out
}

func (g *graph) size(n int64) int64 { return g.paths[n-1].NarSize }

// order sorts groups base first (see Group), merges what exceeds the
// budget into the last layer, and returns them as Layers.
func (g *graph) order(groups [][]int64, budget int) []PathGroup {
	type ranked struct {
		nodes  []int64
		height int
		size   int64
		first  string
	}
	var rs []ranked
	for _, grp := range groups {
		if len(grp) == 0 {
			continue
		}
		r := ranked{nodes: grp}
		r.first = g.paths[slices.Min(grp)-1].Path
		for _, n := range grp {
			r.size += g.size(n)
		}
		rs = append(rs, r)
	}
	height := g.heights()
	for i := range rs {
		for _, n := range rs[i].nodes {
			rs[i].height = max(rs[i].height, height[n])
		}
	}
	slices.SortFunc(rs, func(a, b ranked) int {
		if c := cmp.Compare(a.height, b.height); c != 0 {
			return c
		}
		if c := cmp.Compare(b.size, a.size); c != 0 {
			return c
		}
		return cmp.Compare(a.first, b.first)
	})
	if len(rs) > budget {
		merged := ranked{}
		for _, r := range rs[budget-1:] {
			merged.nodes = append(merged.nodes, r.nodes...)
			merged.size += r.size
		}
		rs = append(rs[:budget-1], merged)
	}
	out := make([]PathGroup, len(rs))
	for i, r := range rs {
		paths := make([]string, len(r.nodes))
		for j, n := range r.nodes {
			paths[j] = g.paths[n-1].Path
		}
		slices.Sort(paths)
		out[i] = PathGroup{Paths: paths, Size: r.size}
	}
	return out
}

// heights gives each path the length of its longest chain of references
// down to a path that refers to nothing: 0 for libc, more for what is
// built on it. Unlike sharing within one image, this is the same in every
// image that holds the path.
func (g *graph) heights() []int {
	h := make([]int, len(g.succ))
	order, ok := g.topoOrder()
	if !ok {
		return h
	}
	for i := len(order) - 1; i >= 0; i-- {
		n := order[i]
		for _, c := range g.succ[n] {
			h[n] = max(h[n], h[c]+1)
		}
	}
	return h
}
