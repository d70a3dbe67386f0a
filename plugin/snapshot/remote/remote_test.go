package remote

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// greeter fills layers labelled "greeting" with a file that says it.
type greeter struct {
	mu       sync.Mutex
	fills    int
	released []string
	fail     error
}

func (g *greeter) Fills(_ context.Context, labels map[string]string) (bool, error) {
	v, ok := labels["greeting"]
	if ok && v == "" {
		return false, errors.New("an empty greeting")
	}
	return ok, nil
}

func (g *greeter) Fill(_ context.Context, key, dir string, labels map[string]string) (map[string]string, error) {
	g.mu.Lock()
	g.fills++
	g.mu.Unlock()
	if g.fail != nil {
		return nil, g.fail
	}
	return map[string]string{"filled-by": key}, os.WriteFile(filepath.Join(dir, "greeting"), []byte(labels["greeting"]), 0o444)
}

func (g *greeter) Release(_ context.Context, key string, labels map[string]string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.released = append(g.released, key+" "+labels["filled-by"])
	return nil
}

func layer(target, greeting string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: target, "greeting": greeting})
}

func TestFilledLayers(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	g := &greeter{}
	s, err := New(t.TempDir(), g)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// A layer the filler makes: filled, committed under the target's
	// name, and answered AlreadyExists as the protocol wants.
	if _, err := s.Prepare(ctx, "extract-1", "", layer("sha256:one", "hello")); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a filled layer: %v", err)
	}
	name := CommitName("sha256:one", "")
	info, err := s.Stat(ctx, name)
	if err != nil || info.Kind != snapshots.KindCommitted || info.Labels["filled-by"] != "extract-1" || info.Labels["greeting"] != "hello" {
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
