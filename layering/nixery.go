package layering

import (
	"strings"

	"gonum.org/v1/gonum/graph/flow"
	"gonum.org/v1/gonum/graph/simple"
)

const (
	// popularThreshold is Nixery's: a path that this many packages of the
	// package set need heads its own layer.
	popularThreshold = 100
	// bigThreshold makes a large path its own layer, as Nixery does — by
	// the path's own size, where Nixery used its closure size.
	bigThreshold = 100 << 20
)

// nixery groups by dominator tree: every path that is a root, popular or
// big is made a child of the image root, and each child of the root in the
// dominator tree heads a layer of everything it dominates — paths that
// only it leads to travel with it. Without popularity data, a path that
// several paths of the closure need counts as popular.
func (g *graph) nixery(budget int, popularity map[string]int) [][]int64 {
	// The extra root edges go into g's gonum graph itself: nothing else
	// reads it (the other walks use g.succ).
	withRoot := g.DirectedGraph
	for n := int64(1); n <= int64(len(g.paths)); n++ {
		separate := g.size(n) >= bigThreshold
		if popularity != nil {
			separate = separate || popularity[storeName(g.paths[n-1].Path)] >= popularThreshold
		} else {
			separate = separate || g.inDegree[n] >= 2
		}
		if separate && !withRoot.HasEdgeFromTo(rootID, n) {
			withRoot.SetEdge(simple.Edge{F: simple.Node(rootID), T: simple.Node(n)})
		}
	}
	dt := flow.Dominators(simple.Node(rootID), withRoot)
	var groups [][]int64
	for _, head := range dt.DominatedBy(rootID) {
		var grp []int64
		stack := []int64{head.ID()}
		for len(stack) > 0 {
			n := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			grp = append(grp, n)
			for _, child := range dt.DominatedBy(n) {
				stack = append(stack, child.ID())
			}
		}
		groups = append(groups, grp)
	}
	return groups
}

// storeName is a store path's name without its hash, as popularity files
// key them ("/nix/store/<hash>-glibc-2.36" → "glibc-2.36").
func storeName(path string) string {
	base := path[strings.LastIndexByte(path, '/')+1:]
	if _, name, ok := strings.Cut(base, "-"); ok {
		return name
	}
	return base
}
