package plugin

import (
	"context"
	"errors"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
)

// Builds of one image that describe its layers differently share one Nix
// build; the client that led it going away fails only its own request.
func TestBuildSharedPlan(t *testing.T) {
	testutil.RequireNix(t)
	src, err := nixbuild.PathSource(testutil.TestPkgs())
	if err != nil {
		t.Fatal(err)
	}
	nix := nixbuild.New(src, nixbuild.WithOptions(testutil.NixOptions()))
	defer nix.Close()
	b := NewImageBuilder(nix, WithMaxBuilds(1))

	// Hold the only build slot, so that both wait in the same plan.
	b.sem <- struct{}{}
	leader, cancel := context.WithCancel(context.Background())
	type result struct {
		img *Image
		err error
	}
	led, joined := make(chan result, 1), make(chan result, 1)
	go func() {
		img, err := b.Build(leader, "nix.local/htop", layer.Digests(nil))
		led <- result{img, err}
	}()
	waitFor(t, func() bool { b.plansMu.Lock(); defer b.plansMu.Unlock(); return len(b.plans) == 1 })
	go func() {
		img, err := b.Build(context.Background(), "nix.local/htop", layer.References(layer.Digests(nil)))
		joined <- result{img, err}
	}()
	waitForPlanCallers(t, b, 2)
	cancel()
	if r := <-led; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("cancelled leader: %v", r.err)
	}
	<-b.sem
	r := <-joined
	if r.err != nil {
		t.Fatalf("the build that joined failed with its leader: %v", r.err)
	}
	if l := r.img.Layers[0]; l.Desc.MediaType != labels.MediaTypeStorePaths {
		t.Errorf("reference build's first layer is %s", l.Desc.MediaType)
	}

	// Both kinds at once: one plan, each its own layers.
	done := make(chan result, 2)
	for _, d := range []layer.Describer{layer.Digests(nil), layer.References(layer.Digests(nil))} {
		go func() {
			img, err := b.Build(context.Background(), "nix.local/htop", d)
			done <- result{img, err}
		}()
	}
	kinds := map[string]bool{}
	for range 2 {
		r := <-done
		if r.err != nil {
			t.Fatal(r.err)
		}
		kinds[r.img.Layers[0].Desc.MediaType] = true
	}
	if !kinds[ocispec.MediaTypeImageLayer] || !kinds[labels.MediaTypeStorePaths] {
		t.Errorf("layer kinds %v: descriptions were shared across describers", kinds)
	}
}

// waitForPlanCallers waits until n callers wait for b's one plan.
func waitForPlanCallers(t *testing.T, b *ImageBuilder, n int) {
	t.Helper()
	waitFor(t, func() bool {
		b.plansMu.Lock()
		defer b.plansMu.Unlock()
		for _, c := range b.plans {
			return c.refs == n
		}
		return false
	})
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
