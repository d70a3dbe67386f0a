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

// graph builds a closure from "path: ref ref" lines; sizes are 10 each.
func graph(spec ...string) []nixbuild.StorePath {
	var out []nixbuild.StorePath
	for _, line := range spec {
		name, refs, _ := strings.Cut(line, ":")
		sp := nixbuild.StorePath{Path: name, NarSize: 10, References: []string{name}}
		sp.References = append(sp.References, strings.Fields(refs)...)
		out = append(out, sp)
	}
	return out
}

func paths(layers []Layer) [][]string {
	var out [][]string
	for _, l := range layers {
		out = append(out, l.Paths)
	}
	return out
}

func TestGroup(t *testing.T) {
	htop := graph("glibc:", "ncurses: glibc", "libnl: glibc", "htop: ncurses libnl glibc", "cacert:")
	for _, tc := range []struct {
		name    string
		roots   []string
		closure []nixbuild.StorePath
		budget  int
		want    [][]string
	}{
		{
			name:    "shared library heads its own layer, first",
			roots:   []string{"htop", "cacert"},
			closure: htop,
			want:    [][]string{{"glibc"}, {"cacert"}, {"htop", "libnl", "ncurses"}},
		},
		{
			name:    "library used by two packages is separate from both",
			roots:   []string{"htop", "nano", "cacert"},
			closure: append(graph("nano: ncurses glibc"), htop...),
			want:    [][]string{{"glibc"}, {"ncurses"}, {"cacert"}, {"htop", "libnl"}, {"nano"}},
		},
		{
			name:    "budget merges the least depended-upon layers",
			roots:   []string{"htop", "nano", "cacert"},
			closure: append(graph("nano: ncurses glibc"), htop...),
			budget:  3,
			want:    [][]string{{"glibc"}, {"ncurses"}, {"cacert", "htop", "libnl", "nano"}},
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
			closure: graph("glibc:", "bash: glibc", "hello: bash"),
			want:    [][]string{{"bash", "glibc"}, {"hello"}},
		},
		{
			name:    "cycles are fine",
			roots:   []string{"a"},
			closure: graph("a: b", "b: c", "c: b"),
			want:    [][]string{{"b", "c"}, {"a"}},
		},
		{
			name: "empty",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []Opt
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

func TestGroupRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		roots   []string
		closure []nixbuild.StorePath
		budget  int
		want    string
	}{
		"dangling reference":  {[]string{"a"}, graph("a: b"), 5, "not in the closure"},
		"root not in closure": {[]string{"x"}, graph("a:"), 5, "not in its closure"},
		"unreachable path":    {[]string{"a"}, graph("a:", "b:"), 5, "not needed by any package"},
		"duplicate path":      {[]string{"a"}, graph("a:", "a:"), 5, "listed twice"},
		"zero budget":         {[]string{"a"}, graph("a:"), 0, "at least 1"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Group(tc.roots, tc.closure, WithBudget(tc.budget))
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want InvalidArgument saying %q", err, tc.want)
			}
		})
	}
}

// randomClosure makes a layered DAG with shared dependencies.
func randomClosure(r *rand.Rand, n int) ([]string, []nixbuild.StorePath) {
	var closure []nixbuild.StorePath
	for i := 0; i < n; i++ {
		sp := nixbuild.StorePath{Path: fmt.Sprintf("/nix/store/%05d-p", i), NarSize: int64(r.IntN(1000) + 1)}
		for j := 0; j < 3 && i > 0; j++ {
			sp.References = append(sp.References, closure[r.IntN(i)].Path)
		}
		slices.Sort(sp.References)
		sp.References = slices.Compact(sp.References)
		closure = append(closure, sp)
	}
	// Every path must be needed: make the unreferenced ones roots.
	referenced := map[string]bool{}
	for _, sp := range closure {
		for _, ref := range sp.References {
			referenced[ref] = true
		}
	}
	var roots []string
	for _, sp := range closure {
		if !referenced[sp.Path] {
			roots = append(roots, sp.Path)
		}
	}
	return roots, closure
}

func TestGroupDeterministic(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	roots, closure := randomClosure(r, 500)
	want, err := Group(roots, closure, WithBudget(20))
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 20 {
		t.Errorf("%d layers, want the budget of 20", len(want))
	}
	for i := 0; i < 10; i++ {
		shuffled := slices.Clone(closure)
		r.Shuffle(len(shuffled), func(a, b int) { shuffled[a], shuffled[b] = shuffled[b], shuffled[a] })
		got, err := Group(roots, shuffled, WithBudget(20))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatal("shuffled input gave different layers")
		}
	}
}

func BenchmarkGroup(b *testing.B) {
	roots, closure := randomClosure(rand.New(rand.NewPCG(1, 2)), 10000)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := Group(roots, closure); err != nil {
			b.Fatal(err)
		}
	}
}
