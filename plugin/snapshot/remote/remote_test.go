package remote

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// greeting labels a layer that greeter fills: inherited from a layer's
// annotations, as containerd.io/snapshot/ labels are.
const greeting = "containerd.io/snapshot/greeting"

// greeter fills layers labelled greeting with a file that says it.
type greeter struct {
	mu       sync.Mutex
	fills    int
	released []string
	fail     error
	// failOn fails the fill of the layer with this greeting; refused,
	// if set, hears that greeting as it fails.
	failOn  string
	refused chan string
	// started, if set, hears the key of each fill as it starts; the fill
	// of a layer whose greeting gates names then waits for that gate.
	started chan string
	gates   map[string]chan struct{}
}

func (g *greeter) Fills(_ context.Context, labels map[string]string) (bool, error) {
	v, ok := labels[greeting]
	if ok && v == "" {
		return false, errors.New("an empty greeting")
	}
	return ok, nil
}

func (g *greeter) Fill(ctx context.Context, key, dir string, labels map[string]string) (map[string]string, error) {
	g.mu.Lock()
	g.fills++
	fail := g.fail
	if labels[greeting] == g.failOn {
		fail = errors.New("greeting refused")
	}
	gate := g.gates[labels[greeting]]
	g.mu.Unlock()
	if g.started != nil {
		g.started <- key
	}
	if gate != nil {
		<-gate
	}
	if fail == nil {
		fail = ctx.Err() // as a Filler stops when its Prepare gives up
	} else if g.refused != nil && labels[greeting] == g.failOn {
		g.refused <- g.failOn
	}
	if fail != nil {
		return nil, fail
	}
	return map[string]string{"filled-by": key}, os.WriteFile(filepath.Join(dir, "greeting"), []byte(labels[greeting]), 0o444)
}

func (g *greeter) Release(_ context.Context, key string, labels map[string]string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.released = append(g.released, key+" "+labels["filled-by"])
	return nil
}

// newGreeted returns a Snapshotter whose layers g fills, as root (it
// mounts), closed when the test ends.
func newGreeted(t *testing.T, g *greeter) *Snapshotter {
	t.Helper()
	testutil.RequireRoot(t)
	s, err := New(t.TempDir(), g)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// drain empties started until the test ends.
func drain(t *testing.T, started chan string) {
	go func() {
		for {
			select {
			case <-started:
			case <-t.Context().Done():
				return
			}
		}
	}()
}

func layer(target, says string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: target, greeting: says})
}

func TestFilledLayers(t *testing.T) {
	ctx := context.Background()
	g := &greeter{}
	s := newGreeted(t, g)

	// A layer the filler makes: filled, committed under the target's
	// name, and answered AlreadyExists as the protocol wants.
	if _, err := s.Prepare(ctx, "extract-1", "", layer("sha256:one", "hello")); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a filled layer: %v", err)
	}
	name := CommitName("sha256:one", "")
	info, err := s.Stat(ctx, name)
	if err != nil || info.Kind != snapshots.KindCommitted || info.Labels["filled-by"] != "extract-1" || info.Labels[greeting] != "hello" {
		t.Fatalf("committed snapshot %+v, %v", info, err)
	}
	mounts, err := s.View(ctx, "view", name)
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 1 || mounts[0].Type != "bind" {
		t.Fatalf("view mounts %+v", mounts)
	}
	if b, err := os.ReadFile(filepath.Join(mounts[0].Source, "greeting")); err != nil || string(b) != "hello" {
		t.Errorf("the layer holds %q, %v", b, err)
	}
	s.Remove(ctx, "view")

	// The same target again (another namespace, a later pull): found,
	// not filled again.
	if _, err := s.Prepare(ctx, "extract-2", "", layer("sha256:one", "hello")); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a layer made already: %v", err)
	}
	if g.fills != 1 {
		t.Errorf("filled %d times", g.fills)
	}

	// Labels the filler refuses fail the layer; those it does not know,
	// and Prepares without a target, are the overlay's.
	if _, err := s.Prepare(ctx, "extract-3", "", layer("sha256:bad", "")); err == nil || errdefs.IsAlreadyExists(err) {
		t.Errorf("Prepare of a refused layer: %v", err)
	}
	if _, err := s.Prepare(ctx, "plain", "", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "sha256:plain"})); err != nil {
		t.Errorf("Prepare of an ordinary layer: %v", err)
	}

	// A failed fill leaves no snapshot, and what it held is released.
	g.fail = errors.New("no greeting today")
	if _, err := s.Prepare(ctx, "extract-4", "", layer("sha256:two", "hi")); !errors.Is(err, g.fail) {
		t.Errorf("Prepare whose fill failed: %v", err)
	}
	var keys []string
	s.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		keys = append(keys, info.Name)
		return nil
	})
	slices.Sort(keys)
	if want := []string{name, "plain"}; !slices.Equal(keys, want) {
		t.Errorf("snapshots %v, want %v", keys, want)
	}

	// Removing a filled layer releases what its fill held.
	if err := s.Remove(ctx, name); err != nil {
		t.Fatal(err)
	}
	if want := []string{"extract-4 ", name + " extract-1"}; !slices.Equal(g.released[len(g.released)-2:], want) {
		t.Errorf("released %q, want the last to be %q", g.released, want)
	}
}

// image is a chain of layers as a manifest and config describe them, the
// filler's labelled as annotations.
func image(says ...string) ([]ocispec.Descriptor, []digest.Digest) {
	var layers []ocispec.Descriptor
	var diffIDs []digest.Digest
	for _, g := range says {
		d := digest.FromString(g)
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: d}
		if g != "" {
			desc.Annotations = map[string]string{greeting: g, "org.example.other": "not inherited"}
		}
		layers = append(layers, desc)
		diffIDs = append(diffIDs, d)
	}
	return layers, diffIDs
}

// unpack prepares the layers as containerd's unpacker does, bottom first,
// each on the backend name the one below was answered with, and returns
// those names.
func unpack(t *testing.T, s *Snapshotter, layers []ocispec.Descriptor, diffIDs []digest.Digest) []string {
	t.Helper()
	ctx := context.Background()
	var names []string
	parent := ""
	for i := range layers {
		target := identity.ChainID(diffIDs[:i+1]).String()
		labels := snapshots.FilterInheritedLabels(layers[i].Annotations)
		if labels == nil {
			labels = map[string]string{}
		}
		labels[snapshots.LabelSnapshotRef] = target
		if _, err := s.Prepare(ctx, fmt.Sprintf("extract-%d", i), parent, snapshots.WithLabels(labels)); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare of layer %d: %v", i, err)
		}
		parent = CommitName(target, parent)
		if info, err := s.Stat(ctx, parent); err != nil || info.Kind != snapshots.KindCommitted {
			t.Fatalf("layer %d: %+v, %v", i, info, err)
		}
		names = append(names, parent)
	}
	return names
}

func backendNames(t *testing.T, s *Snapshotter) []string {
	t.Helper()
	var names []string
	if err := s.Walk(context.Background(), func(_ context.Context, info snapshots.Info) error {
		names = append(names, info.Name)
		return nil
	}); err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
	slices.Sort(names)
	return names
}

func TestPrefill(t *testing.T) {
	ctx := context.Background()
	g := &greeter{started: make(chan string, 16)}
	s := newGreeted(t, g)

	// Prefilled, then asked for as containerd would once the prefill
	// fills the top layer: each layer is filled once, by the prefill
	// (the last Prepare finds its fill under way, or done), and none is
	// removed at release, as each was taken.
	layers, diffIDs := image("one", "two", "three")
	release := s.Prefill(ctx, layers, diffIDs)
	for range 3 {
		if key := <-g.started; !strings.HasPrefix(key, "prefill-") {
			t.Fatalf("a fill by %s, want the prefill", key)
		}
	}
	names := unpack(t, s, layers, diffIDs)
	release()
	if g.fills != 3 {
		t.Errorf("%d fills of 3 layers", g.fills)
	}
	if got, want := backendNames(t, s), slices.Sorted(slices.Values(names)); !slices.Equal(got, want) {
		t.Errorf("after release: %v, want %v", got, want)
	}
	for i, name := range names {
		info, _ := s.Stat(ctx, name)
		if want := []string{"", names[0], names[1]}[i]; info.Parent != want {
			t.Errorf("layer %d on %q, want %q", i, info.Parent, want)
		}
		if !strings.HasPrefix(info.Labels["filled-by"], "prefill-") || info.Labels["org.example.other"] != "" {
			t.Errorf("layer %d labelled %v: want filled by the prefill, and only inherited annotations", i, info.Labels)
		}
	}

	// A prefill that nothing takes (the pull failed first): what it made
	// is removed at release, children first, and what it held released;
	// what was there before it stays.
	layers, diffIDs = image("one", "two", "four", "five")
	g.mu.Lock()
	g.released = nil
	g.mu.Unlock()
	release = s.Prefill(ctx, layers, diffIDs)
	<-g.started
	<-g.started // five's fill has begun: release waits for it to end
	release()
	if got, want := backendNames(t, s), slices.Sorted(slices.Values(names)); !slices.Equal(got, want) {
		t.Errorf("after releasing an untaken prefill: %v, want %v", got, want)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.released) != 2 {
		t.Errorf("released %q, want the two layers made", g.released)
	}
}

// The layers of a prefill are filled beside each other, and committed
// bottom first, each onto the one below; where one fails, those above it
// are not committed, and the Prepares of containerd's unpacker fill them.
func TestPrefillBeside(t *testing.T) {
	ctx := context.Background()
	gate := make(chan struct{})
	g := &greeter{started: make(chan string, 16), gates: map[string]chan struct{}{"one": gate}}
	s := newGreeted(t, g)

	layers, diffIDs := image("one", "two", "three")
	release := s.Prefill(ctx, layers, diffIDs)
	for i := range 3 { // the bottom layer's fill waits until all have begun
		select {
		case <-g.started:
		case <-time.After(time.Minute):
			t.Fatalf("%d of 3 fills began while the bottom layer's was under way", i)
		}
	}
	close(gate)
	names := unpack(t, s, layers, diffIDs)
	release()
	for i, name := range names {
		info, _ := s.Stat(ctx, name)
		if want := []string{"", names[0], names[1]}[i]; info.Parent != want {
			t.Errorf("layer %d on %q, want %q", i, info.Parent, want)
		}
		if !strings.HasPrefix(info.Labels["filled-by"], "prefill-") {
			t.Errorf("layer %d filled by %q, want the prefill", i, info.Labels["filled-by"])
		}
	}

	g.mu.Lock()
	g.failOn, g.gates = "four", nil
	g.mu.Unlock()
	layers, diffIDs = image("four", "five", "six")
	release = s.Prefill(ctx, layers, diffIDs)
	for range 3 {
		<-g.started
	}
	release()
	if got, want := backendNames(t, s), slices.Sorted(slices.Values(names)); !slices.Equal(got, want) {
		t.Errorf("after a prefill whose bottom layer failed: %v, want %v", got, want)
	}
	g.mu.Lock()
	g.failOn = ""
	g.mu.Unlock()
	drain(t, g.started) // the Prepares' own fills
	for i, name := range unpack(t, s, layers, diffIDs) {
		if info, _ := s.Stat(ctx, name); !strings.HasPrefix(info.Labels["filled-by"], "extract-") {
			t.Errorf("layer %d filled by %q after a failed prefill, want its Prepare", i, info.Labels["filled-by"])
		}
	}
}

// A layer of a prefill that fails stops those above it, not those below,
// which are still being filled: they are made, and found by the Prepares.
func TestPrefillUpperLayerFails(t *testing.T) {
	ctx := context.Background()
	gate := make(chan struct{})
	g := &greeter{started: make(chan string, 16), failOn: "two", refused: make(chan string, 1), gates: map[string]chan struct{}{"one": gate}}
	s := newGreeted(t, g)
	layers, diffIDs := image("one", "two", "three")
	release := s.Prefill(ctx, layers, diffIDs)
	defer release()
	drain(t, g.started)
	<-g.refused // two failed while one is held at its gate
	// (The prefill stops what is above two just after: given the time,
	// a prefill that stopped everything would stop one too.)
	time.Sleep(50 * time.Millisecond)
	g.mu.Lock()
	g.failOn = ""
	g.mu.Unlock()
	close(gate)
	names := unpack(t, s, layers, diffIDs)
	for i, want := range []string{"prefill-", "extract-", "extract-"} {
		if info, _ := s.Stat(ctx, names[i]); !strings.HasPrefix(info.Labels["filled-by"], want) {
			t.Errorf("layer %d filled by %q, want %s…", i, info.Labels["filled-by"], want)
		}
	}
}
