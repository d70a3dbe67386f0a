package layer

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// Ahead hashes an image's layers by itself, beside each other, and
// describing them then reads none again; each layer is read once, whether
// Ahead or Describe gets to it first.
func TestDigestsAhead(t *testing.T) {
	ctx := context.Background()
	c := testutil.Cache(t)
	var layers []*Layer
	for i := range 6 {
		l := testLayer(t)
		if i >= 3 { // read for long enough that Ahead and Describe overlap
			bigLayer(t, l, 16<<20)
		}
		layers = append(layers, l)
	}
	d := Digests(c)
	before := promtest.ToFloat64(layersPacked)
	stop := d.Ahead(ctx, layers[:3])
	for deadline := time.Now().Add(time.Minute); !(c.HasLayer(layers[0].CacheKey()) && c.HasLayer(layers[1].CacheKey()) && c.HasLayer(layers[2].CacheKey())); {
		if time.Now().After(deadline) {
			t.Fatal("Ahead hashed nothing by itself")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	stop = d.Ahead(ctx, layers) // the first three known: the others, beside describing
	var chain digest.Digest
	for _, l := range layers {
		if err := d.Describe(ctx, chain, l); err != nil {
			t.Fatal(err)
		}
		if want := tarDescriptor(t, l); l.Desc.Digest != want.Digest || l.Desc.Size != want.Size {
			t.Errorf("layer described as %s (%d bytes), its tar is %s (%d bytes)", l.Desc.Digest, l.Desc.Size, want.Digest, want.Size)
		}
		chain = ChainID(chain, l.Desc.Digest)
	}
	stop()
	if n := promtest.ToFloat64(layersPacked) - before; n != float64(len(layers)) {
		t.Errorf("%v layers read to be hashed, want each of %d once", n, len(layers))
	}
}

// bigLayer makes l's one file size bytes.
func bigLayer(t testing.TB, l *Layer, size int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(l.Paths[0], "bin", "pkg"), bytes.Repeat([]byte{1}, size), 0o555); err != nil {
		t.Fatal(err)
	}
}

// A Describe that joined the hashing Ahead began is not failed by Ahead
// being stopped: it hashes the layer itself.
func TestDigestsAheadStopped(t *testing.T) {
	ctx := context.Background()
	l := testLayer(t)
	bigLayer(t, l, 64<<20)
	want := tarDescriptor(t, l)
	for range 5 {
		d := Digests(testutil.Cache(t))
		stop := d.Ahead(ctx, []*Layer{l})
		time.Sleep(20 * time.Millisecond) // Ahead hashing (for about 100 ms)
		described := make(chan error, 1)
		go func() { described <- d.Describe(ctx, "", l) }()
		time.Sleep(20 * time.Millisecond) // Describe joined it
		stop()
		if err := <-described; err != nil {
			t.Fatalf("Describe failed as Ahead stopped: %v", err)
		}
		if l.Desc.Digest != want.Digest {
			t.Errorf("described as %s, its tar is %s", l.Desc.Digest, want.Digest)
		}
	}
}

// BenchmarkDigestsAhead describes the 8 layers of an image (16 MiB
// each, nothing cached) in order, as a first pull does, with Ahead and,
// side by side in each iteration, without it (a digest at a time), and
// reports the first as a multiple of the second.
func BenchmarkDigestsAhead(b *testing.B) {
	var layers []*Layer
	for range 8 {
		l := testLayer(b)
		bigLayer(b, l, 16<<20)
		layers = append(layers, l)
	}
	describe := func(ahead bool) time.Duration {
		d := Digests(testutil.Cache(b))
		start := time.Now()
		if ahead {
			defer d.Ahead(context.Background(), layers)()
		}
		var chain digest.Digest
		for _, l := range layers {
			if err := d.Describe(context.Background(), chain, l); err != nil {
				b.Fatal(err)
			}
			chain = ChainID(chain, l.Desc.Digest)
		}
		return time.Since(start)
	}
	describe(false) // the page cache warmed
	var aheadT, inOrderT time.Duration
	b.ResetTimer()
	for range b.N {
		aheadT += describe(true)
		inOrderT += describe(false)
	}
	b.ReportMetric(float64(aheadT)/float64(inOrderT), "ahead/in-order")
}
