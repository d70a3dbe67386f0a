// Package layering groups a runtime closure into image layers. It is pure:
// the same graph always gives the same layers in the same order.
package layering

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/containerd/errdefs"
	"gonum.org/v1/gonum/graph/flow"
	"gonum.org/v1/gonum/graph/simple"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// DefaultBudget is how many store-path layers an image gets at most:
// Nixery's budget, which leaves room under the 125-layer limit of overlay
// mounts for the symlink layer and for layers users add on top.
const DefaultBudget = 93

// Layer is a group of store paths that go into one image layer.
type Layer struct {
	Paths []string // sorted
	Size  int64    // sum of the paths' NAR sizes
}

type options struct{ budget int }

// Opt adjusts Group.
type Opt func(*options)

// WithBudget sets the most layers Group returns (at least 1).
func WithBudget(n int) Opt { return func(o *options) { o.budget = n } }

// Group splits closure into layers, following Nixery's dominator-tree idea:
// a path that only one other path leads to travels with it, while every
// root package and every path needed by several others heads its own layer,
// since that is what other images are likely to share. Layers are ordered
// so that those whose head has the most referrers come first (the chain of
// snapshots of such layers is the prefix other images reuse); when there are
// more layers than the budget allows, the tail is merged into the last one.
func Group(roots []string, closure []nixbuild.StorePath, opts ...Opt) ([]Layer, error) {
	o := options{budget: DefaultBudget}
	for _, opt := range opts {
		opt(&o)
	}
	if o.budget < 1 {
		return nil, fmt.Errorf("layer budget %d: must be at least 1: %w", o.budget, errdefs.ErrInvalidArgument)
	}
	if len(closure) == 0 {
		return nil, nil
	}

	// Node IDs follow the sorted path order, so everything downstream is
	// independent of the order the closure arrived in.
	sorted := slices.Clone(closure)
	slices.SortFunc(sorted, func(a, b nixbuild.StorePath) int { return cmp.Compare(a.Path, b.Path) })
	id := make(map[string]int64, len(sorted))
	for i, sp := range sorted {
		if _, dup := id[sp.Path]; dup {
			return nil, fmt.Errorf("store path %s listed twice: %w", sp.Path, errdefs.ErrInvalidArgument)
		}
		id[sp.Path] = int64(i + 1)
	}
	const rootID = 0

	g := simple.NewDirectedGraph()
	g.AddNode(simple.Node(rootID))
	for i := range sorted {
		g.AddNode(simple.Node(int64(i + 1)))
	}
	// referrers counts who needs a path (a root package counts twice, so it
	// is always a layer head); inDegree only other store paths.
	referrers := make([]int, len(sorted)+1)
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
			referrers[to]++
		}
	}
	inDegree := slices.Clone(referrers)
	for _, r := range roots {
		to, ok := id[r]
		if !ok {
			return nil, fmt.Errorf("package %s is not in its closure: %w", r, errdefs.ErrInvalidArgument)
		}
		referrers[to] += 2
	}
	for n := int64(1); n <= int64(len(sorted)); n++ {
		if referrers[n] >= 2 && !g.HasEdgeFromTo(rootID, n) {
			g.SetEdge(simple.Edge{F: simple.Node(rootID), T: simple.Node(n)})
		}
	}

	dt := flow.Dominators(simple.Node(rootID), g)
	var layers []group
	for _, head := range dt.DominatedBy(rootID) {
		grp := group{head: head.ID()}
		stack := []int64{head.ID()}
		for len(stack) > 0 {
			n := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			sp := sorted[n-1]
			grp.paths = append(grp.paths, sp.Path)
			grp.size += sp.NarSize
			for _, child := range dt.DominatedBy(n) {
				stack = append(stack, child.ID())
			}
		}
		grp.referrers = inDegree[head.ID()]
		layers = append(layers, grp)
	}
	if reached := sumPaths(layers); reached != len(sorted) {
		return nil, fmt.Errorf("%d of %d store paths are not needed by any package: %w", len(sorted)-reached, len(sorted), errdefs.ErrInvalidArgument)
	}

	slices.SortFunc(layers, func(a, b group) int {
		if c := cmp.Compare(b.referrers, a.referrers); c != 0 {
			return c
		}
		return cmp.Compare(sorted[a.head-1].Path, sorted[b.head-1].Path)
	})
	if len(layers) > o.budget {
		tail := layers[o.budget-1:]
		merged := group{}
		for _, l := range tail {
			merged.paths = append(merged.paths, l.paths...)
			merged.size += l.size
		}
		layers = append(layers[:o.budget-1], merged)
	}

	out := make([]Layer, len(layers))
	for i, l := range layers {
		slices.Sort(l.paths)
		out[i] = Layer{Paths: l.paths, Size: l.size}
	}
	return out, nil
}

type group struct {
	head      int64
	paths     []string
	size      int64
	referrers int
}

func sumPaths(layers []group) int {
	n := 0
	for _, l := range layers {
		n += len(l.paths)
	}
	return n
}
