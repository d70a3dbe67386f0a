package layering

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// universe is a synthetic package set shaped like nixpkgs: one libc all
// depend on, a few core libraries, many libraries, language runtimes, and
// applications on top.
type universe struct {
	paths map[string]nixbuild.StorePath
	apps  []string
}

func newUniverse(r *rand.Rand) *universe {
	u := &universe{paths: map[string]nixbuild.StorePath{}}
	add := func(name string, size int64, refs ...string) string {
		p := fmt.Sprintf("/nix/store/%032d-%s", len(u.paths), name)
		slices.Sort(refs)
		refs = slices.Compact(refs)
		u.paths[p] = nixbuild.StorePath{Path: p, NarSize: size, References: append([]string{p}, refs...)}
		return p
	}
	mib := int64(1 << 20)
	glibc := add("glibc", 30*mib)
	pick := func(from []string, n int) []string {
		var out []string
		for i := 0; i < n && len(from) > 0; i++ {
			out = append(out, from[r.IntN(len(from))])
		}
		return out
	}
	var core []string
	for i := 0; i < 8; i++ {
		core = append(core, add(fmt.Sprintf("core%d", i), int64(1+r.IntN(5))*mib, glibc))
	}
	var libs []string
	for i := 0; i < 80; i++ {
		libs = append(libs, add(fmt.Sprintf("lib%d", i), int64(r.IntN(8)+1)*mib/2, append(pick(core, 2), glibc)...))
	}
	var runtimes []string
	for i, size := range []int64{120, 60, 200} {
		runtimes = append(runtimes, add(fmt.Sprintf("runtime%d", i), size*mib, append(pick(libs, 4), glibc)...))
	}
	for i := 0; i < 200; i++ {
		refs := append(pick(libs, 1+r.IntN(5)), glibc)
		if r.IntN(4) == 0 {
			refs = append(refs, runtimes[r.IntN(len(runtimes))])
		}
		u.apps = append(u.apps, add(fmt.Sprintf("app%d", i), int64(r.IntN(40)+1)*mib/4, refs...))
	}
	u.apps = append(u.apps, add("cacert", mib/2), add("iana-etc", mib/4))
	return u
}

// closure of roots, as nixbuild returns it.
func (u *universe) closure(roots []string) []nixbuild.StorePath {
	seen := map[string]bool{}
	var out []nixbuild.StorePath
	var walk func(string)
	walk = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		out = append(out, u.paths[p])
		for _, ref := range u.paths[p].References {
			walk(ref)
		}
	}
	for _, r := range roots {
		walk(r)
	}
	return out
}

// reuse provisions images one after another and returns the bytes a
// content store (unique layers) and overlay snapshots (unique layer
// chains) hold, and the ideal: each store path stored once.
func reuse(t testing.TB, u *universe, images [][]string, algo Algorithm, budget int) (content, snapshots, ideal int64) {
	seenPath := map[string]bool{}
	seenLayer := map[string]bool{}
	seenChain := map[string]bool{}
	for _, roots := range images {
		closure := u.closure(roots)
		for _, sp := range closure {
			if !seenPath[sp.Path] {
				seenPath[sp.Path] = true
				ideal += sp.NarSize
			}
		}
		layers, err := Group(roots, closure, WithAlgorithm(algo), WithBudget(budget))
		if err != nil {
			t.Fatal(err)
		}
		chain := ""
		for _, l := range layers {
			key := strings.Join(l.Paths, " ")
			if !seenLayer[key] {
				seenLayer[key] = true
				content += l.Size
			}
			chain += "|" + key
			if !seenChain[chain] {
				seenChain[chain] = true
				snapshots += l.Size
			}
		}
	}
	return content, snapshots, ideal
}

func reuseImages(r *rand.Rand, u *universe, n int) [][]string {
	apps := u.apps[:len(u.apps)-2]
	always := u.apps[len(u.apps)-2:]
	var images [][]string
	for i := 0; i < n; i++ {
		roots := slices.Clone(always)
		for j := 0; j < 1+r.IntN(4); j++ {
			roots = append(roots, apps[r.IntN(len(apps))])
		}
		slices.Sort(roots)
		images = append(images, slices.Compact(roots))
	}
	return images
}

// BenchmarkLayerReuse provisions 25 different images of a synthetic
// package set one after another and reports, per algorithm, the bytes
// stored in the content store and in overlay snapshots as multiples of the
// ideal (every store path stored once). The nix snapshotter stores none.
// "tight" gives each image 8 layers instead of 93: closures larger than the
// budget, as big nixpkgs closures are.
func BenchmarkLayerReuse(b *testing.B) {
	r := rand.New(rand.NewPCG(7, 11))
	u := newUniverse(r)
	images := reuseImages(r, u, 25)
	for i := 0; i < b.N; i++ {
		for _, algo := range []Algorithm{Nixery, AutoLayer} {
			for _, budget := range []struct {
				name string
				n    int
			}{{"", DefaultBudget}, {"tight-", 8}} {
				content, snapshots, ideal := reuse(b, u, images, algo, budget.n)
				b.ReportMetric(float64(content)/float64(ideal), budget.name+string(algo)+"-content/ideal")
				b.ReportMetric(float64(snapshots)/float64(ideal), budget.name+string(algo)+"-snapshots/ideal")
			}
		}
	}
}

// The grouping must not store a closure's bytes twice within one image,
// and across images it must beat storing every image whole.
func TestLayerReuseSanity(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 11))
	u := newUniverse(r)
	images := reuseImages(r, u, 25)
	var whole int64
	for _, roots := range images {
		for _, sp := range u.closure(roots) {
			whole += sp.NarSize
		}
	}
	for _, algo := range []Algorithm{Nixery, AutoLayer} {
		content, _, ideal := reuse(t, u, images, algo, DefaultBudget)
		if content < ideal || content >= whole {
			t.Errorf("%s: content %d, ideal %d, images whole %d", algo, content, ideal, whole)
		}
	}
}
