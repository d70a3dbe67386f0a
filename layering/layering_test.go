package layering

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// closureOf builds a closure from "path: ref ref" lines; sizes are 10 each.
func closureOf(spec ...string) []nixbuild.StorePath {
	var out []nixbuild.StorePath
	for _, line := range spec {
		name, refs, _ := strings.Cut(line, ":")
		sp := nixbuild.StorePath{Path: name, NarSize: 10, References: []string{name}}
		sp.References = append(sp.References, strings.Fields(refs)...)
		out = append(out, sp)
	}
	return out
}

func paths(layers []PathGroup) [][]string {
	var out [][]string
	for _, l := range layers {
		out = append(out, l.Paths)
	}
	return out
}

// TestGroup is the Nixery algorithm's table.
func TestGroup(t *testing.T) {
	htop := closureOf("glibc:", "ncurses: glibc", "libnl: glibc", "htop: ncurses libnl glibc", "cacert:")
	for _, tc := range []struct {
		name    string
		roots   []string
		closure []nixbuild.StorePath
		budget  int
		want    [][]string
	}{
		{
			name:    "shared library heads its own layer; bases first",
			roots:   []string{"htop", "cacert"},
			closure: htop,
			want:    [][]string{{"cacert"}, {"glibc"}, {"htop", "libnl", "ncurses"}},
		},
		{
			name:    "library used by two packages is separate from both",
			roots:   []string{"htop", "nano", "cacert"},
			closure: append(closureOf("nano: ncurses glibc"), htop...),
			want:    [][]string{{"cacert"}, {"glibc"}, {"ncurses"}, {"htop", "libnl"}, {"nano"}},
		},
		{
			name:    "budget merges the top layers",
			roots:   []string{"htop", "nano", "cacert"},
			closure: append(closureOf("nano: ncurses glibc"), htop...),
			budget:  3,
			want:    [][]string{{"cacert"}, {"glibc"}, {"htop", "libnl", "nano", "ncurses"}},
		},
		{
			name:    "budget of one is one layer",
			roots:   []string{"htop", "cacert"},
			closure: htop,
			budget:  1,
			want:    [][]string{{"cacert", "glibc", "htop", "libnl", "ncurses"}},
		},
		{
			name:    "a root that another root needs is still its own layer",
			roots:   []string{"bash", "hello"},
			closure: closureOf("glibc:", "bash: glibc", "hello: bash"),
			want:    [][]string{{"bash", "glibc"}, {"hello"}},
		},
		{
			name:    "cycles are fine",
			roots:   []string{"a"},
			closure: closureOf("a: b", "b: c", "c: b"),
			want:    [][]string{{"b", "c"}, {"a"}},
		},
		{
			name: "empty",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := []Opt{WithAlgorithm(Nixery)}
			if tc.budget > 0 {
				opts = append(opts, WithBudget(tc.budget))
			}
			layers, err := Group(tc.roots, tc.closure, opts...)
			if err != nil {
				t.Fatal(err)
			}
			if got := paths(layers); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			var size int64
			for _, l := range layers {
				size += l.Size
			}
			if want := int64(10 * len(tc.closure)); size != want {
				t.Errorf("sizes add up to %d, want %d", size, want)
			}
		})
	}
}

func TestGroupAutoLayer(t *testing.T) {
	// Sizes make the order: big is the largest path.
	closure := closureOf("glibc:", "ncurses: glibc", "libnl: glibc", "htop: ncurses libnl glibc", "nano: ncurses glibc", "cacert:")
	for i := range closure {
		if closure[i].Path == "libnl" {
			closure[i].NarSize = 500
		}
	}
	roots := []string{"htop", "nano", "cacert"}
	for _, tc := range []struct {
		budget int
		want   [][]string
	}{
		// Room for every path: each is a primary.
		{10, [][]string{{"cacert"}, {"glibc"}, {"libnl"}, {"ncurses"}, {"htop"}, {"nano"}}},
		// Primaries largest first (libnl), then in path order until one
		// more would make too many layers: htop would split its group.
		{5, [][]string{{"cacert"}, {"glibc"}, {"libnl"}, {"htop", "nano", "ncurses"}}},
		{4, [][]string{{"cacert"}, {"glibc"}, {"libnl"}, {"htop", "nano", "ncurses"}}},
		// Fewer layers than that: the top ones are merged.
		{2, [][]string{{"cacert", "glibc", "htop", "libnl", "nano", "ncurses"}}},
	} {
		layers, err := Group(roots, closure, WithAlgorithm(AutoLayer), WithBudget(tc.budget))
		if err != nil {
			t.Fatal(err)
		}
		if got := paths(layers); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("budget %d: got %v, want %v", tc.budget, got, tc.want)
		}
	}
}

func TestGroupPopularity(t *testing.T) {
	closure := closureOf("/nix/store/a-glibc-2.36:", "/nix/store/b-htop: /nix/store/a-glibc-2.36")
	roots := []string{"/nix/store/b-htop"}
	layers, _ := Group(roots, closure, WithAlgorithm(Nixery))
	if len(layers) != 1 {
		t.Errorf("without popularity: %v", paths(layers))
	}
	layers, _ = Group(roots, closure, WithAlgorithm(Nixery), WithPopularity(map[string]int{"glibc-2.36": 5000}))
	if got := paths(layers); !reflect.DeepEqual(got, [][]string{{"/nix/store/a-glibc-2.36"}, {"/nix/store/b-htop"}}) {
		t.Errorf("with popularity: %v", got)
	}
	if _, err := Group(roots, closure, WithAlgorithm("magic")); !errdefs.IsInvalidArgument(err) {
		t.Errorf("unknown algorithm: %v", err)
	}
}

func TestGroupRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		roots   []string
		closure []nixbuild.StorePath
		budget  int
		want    string
	}{
		"dangling reference":  {[]string{"a"}, closureOf("a: b"), 5, "not in the closure"},
		"root not in closure": {[]string{"x"}, closureOf("a:"), 5, "not in its closure"},
		"unreachable path":    {[]string{"a"}, closureOf("a:", "b:"), 5, "not needed by any package"},
		"duplicate path":      {[]string{"a"}, closureOf("a:", "a:"), 5, "listed twice"},
		"zero budget":         {[]string{"a"}, closureOf("a:"), 0, "at least 1"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Group(tc.roots, tc.closure, WithBudget(tc.budget))
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want InvalidArgument saying %q", err, tc.want)
			}
		})
	}
}

// randomClosure makes an image's closure: n paths in a DAG with shared
// dependencies (each path refers to up to three earlier ones), sizes spread
// over three orders of magnitude, and 20 requested packages that need all.
func randomClosure(r *rand.Rand, n int) ([]string, []nixbuild.StorePath) {
	const roots = 20
	var closure []nixbuild.StorePath
	for i := 0; i < n; i++ {
		sp := nixbuild.StorePath{Path: fmt.Sprintf("/nix/store/%05d-p", i), NarSize: int64(r.IntN(1000)+1) * int64(1+r.IntN(1000))}
		for j := 0; j < 3 && i > 0; j++ {
			sp.References = append(sp.References, closure[r.IntN(i)].Path)
		}
		closure = append(closure, sp)
	}
	// The last paths are the packages; they also need whatever nothing
	// else does, so every path is in the closure of some package.
	referenced := map[string]bool{}
	for _, sp := range closure {
		for _, ref := range sp.References {
			referenced[ref] = true
		}
	}
	k := 0
	for i := 0; i < n-roots; i++ {
		if !referenced[closure[i].Path] {
			root := &closure[n-roots+k%roots]
			root.References = append(root.References, closure[i].Path)
			k++
		}
	}
	var rootPaths []string
	for i := range closure {
		slices.Sort(closure[i].References)
		closure[i].References = slices.Compact(closure[i].References)
		if i >= n-roots {
			rootPaths = append(rootPaths, closure[i].Path)
		}
	}
	return rootPaths, closure
}

func TestGroupDeterministic(t *testing.T) {
	for _, algo := range []Algorithm{Nixery, AutoLayer} {
		r := rand.New(rand.NewPCG(1, 2))
		roots, closure := randomClosure(r, 500)
		want, err := Group(roots, closure, WithBudget(20), WithAlgorithm(algo))
		if err != nil {
			t.Fatal(err)
		}
		if len(want) > 20 || len(want) < 15 {
			t.Errorf("%s: %d layers, want close to the budget of 20", algo, len(want))
		}
		var n int
		for _, l := range want {
			n += len(l.Paths)
		}
		if n != len(closure) {
			t.Errorf("%s: %d paths in layers, %d in the closure", algo, n, len(closure))
		}
		for i := 0; i < 5; i++ {
			shuffled := slices.Clone(closure)
			r.Shuffle(len(shuffled), func(a, b int) { shuffled[a], shuffled[b] = shuffled[b], shuffled[a] })
			got, err := Group(roots, shuffled, WithBudget(20), WithAlgorithm(algo))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("%s: shuffled input gave different layers", algo)
			}
		}
	}
}

// BenchmarkGroup groups a generated 10 000-node closure (goal: 100 ms).
func BenchmarkGroup(b *testing.B) {
	roots, closure := randomClosure(rand.New(rand.NewPCG(1, 2)), 10000)
	for _, algo := range []Algorithm{Nixery, AutoLayer} {
		b.Run(string(algo), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if _, err := Group(roots, closure, WithAlgorithm(algo)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Options that group alike have one identity; any that differ, another.
func TestIdentity(t *testing.T) {
	same := [][]Opt{nil, {WithAlgorithm(DefaultAlgorithm)}, {WithBudget(DefaultBudget)}}
	for _, opts := range same {
		if got, want := Identity(opts...), Identity(); got != want {
			t.Errorf("Identity(%d opts) = %q, want %q", len(opts), got, want)
		}
	}
	seen := map[string]bool{}
	for _, opts := range [][]Opt{nil, {WithBudget(3)}, {WithAlgorithm(Nixery)},
		{WithAlgorithm(Nixery), WithPopularity(map[string]int{"glibc": 9})},
		{WithAlgorithm(Nixery), WithPopularity(map[string]int{"glibc": 8})}} {
		id := Identity(opts...)
		if seen[id] {
			t.Errorf("identity %q of different options", id)
		}
		seen[id] = true
	}
	if Identity(WithPopularity(map[string]int{"a": 1, "b": 2})) != Identity(WithPopularity(map[string]int{"b": 2, "a": 1})) {
		t.Error("one popularity map, two identities")
	}
}
