package progress

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
)

type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) Event(e Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, string(e.Kind)+" "+e.Text)
}

func (r *recorder) got() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

func TestSend(t *testing.T) {
	ctx := context.Background()
	if Watched(ctx) {
		t.Error("a context without a sink is watched")
	}
	Step(ctx, "nobody sees %d", 1) // no sink: nothing happens
	var r recorder
	ctx = WithSink(ctx, &r)
	if !Watched(ctx) {
		t.Error("a context with a sink is not watched")
	}
	Nix(ctx, "building")
	Step(ctx, "layer %d/%d", 1, 2)
	if got, want := r.got(), []string{"nix building", "step layer 1/2"}; !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
}

// Work shared by requests reports to each while it waits, and to none
// after it left; the shared work's context is watched only while someone
// watches it.
func TestShared(t *testing.T) {
	var shared Shared
	var a, b recorder
	work, leaveA := shared.Join(WithSink(context.Background(), &a), "img")
	_, leaveB := shared.Join(WithSink(context.Background(), &b), "img")
	_, leaveC := shared.Join(context.Background(), "img") // watches nothing
	Nix(work, "one")
	leaveA()
	leaveA() // twice is once
	Nix(work, "two")
	if !Watched(work) {
		t.Error("work watched by b is not watched")
	}
	leaveB()
	if Watched(work) {
		t.Error("work nobody watches is watched")
	}
	Nix(work, "three")
	if got, want := a.got(), []string{"nix one"}; !slices.Equal(got, want) {
		t.Errorf("a got %q, want %q", got, want)
	}
	if got, want := b.got(), []string{"nix one", "nix two"}; !slices.Equal(got, want) {
		t.Errorf("b got %q, want %q", got, want)
	}
	// C still waits: the work is still the one joined.
	var d recorder
	_, leaveD := shared.Join(WithSink(context.Background(), &d), "img")
	Nix(work, "four")
	if got := d.got(); !slices.Equal(got, []string{"nix four"}) {
		t.Errorf("a request joining work under way got %q", got)
	}
	leaveC()
	leaveD()
	if len(shared.works) != 0 {
		t.Errorf("works left after every request left: %v", shared.works)
	}
	// Another key is another work.
	var e recorder
	other, leaveE := shared.Join(WithSink(context.Background(), &e), "other")
	defer leaveE()
	Nix(other, "x")
	Nix(work, "y")
	if got := e.got(); !slices.Equal(got, []string{"nix x"}) {
		t.Errorf("events of another key: %q", got)
	}
}

// Shared work waiting for other shared work (an image's build waiting for
// the Nix build it shares) passes its events on, and is watched only as
// far as a person watches it.
func TestSharedNested(t *testing.T) {
	var shared Shared
	outer, leaveOuter := shared.Join(context.Background(), "flight") // no one watches
	inner, leaveInner := shared.Join(outer, "plan")
	defer leaveOuter()
	defer leaveInner()
	if Watched(inner) {
		t.Error("work no one watches, through shared work, is watched")
	}
	var r recorder
	_, leave := shared.Join(WithSink(context.Background(), &r), "flight")
	defer leave()
	if !Watched(inner) {
		t.Error("work a person watches through shared work is not watched")
	}
	Nix(inner, "built")
	if got := r.got(); !slices.Equal(got, []string{"nix built"}) {
		t.Errorf("events through shared work: %q", got)
	}
}

func TestBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 5 << 30: "5.0 GiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %s, want %s", n, got, want)
		}
	}
}

// A watcher that does not read stalls nothing: events beyond what waits
// are dropped and counted, and none arrive after Close.
func TestBuffered(t *testing.T) {
	release := make(chan struct{})
	var r recorder
	slow := SinkFunc(func(e Event) {
		<-release
		r.Event(e)
	})
	b := NewBuffered(slow, 2)
	for i := range 10 {
		b.Event(Event{Kind: KindNix, Text: fmt.Sprint(i)}) // never blocks
	}
	close(release)
	dropped := b.Close()
	b.Event(Event{Kind: KindNix, Text: "late"})
	got := r.got()
	if dropped+len(got) != 10 || dropped < 7 || slices.Contains(got, "nix late") {
		t.Errorf("delivered %q, dropped %d", got, dropped)
	}
	if b.Close() != dropped {
		t.Error("Close twice counts again")
	}
}
