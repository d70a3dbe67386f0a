package push

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// fakeNix records pushes; a push waits for gate when it is set and fails
// while fail is.
type fakeNix struct {
	mu     sync.Mutex
	pushed []string // "uri paths..."
	ended  []error  // why the pushes that waited for gate ended
	gate   chan struct{}
	// entered, if set, hears of each push that starts.
	entered chan struct{}
	fail    error
}

func (f *fakeNix) Hold(context.Context, []string) (*nixbuild.Roots, error) { return nil, nil }

func (f *fakeNix) Push(ctx context.Context, uri string, paths []string) error {
	if f.entered != nil {
		f.entered <- struct{}{}
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			f.mu.Lock()
			f.ended = append(f.ended, context.Cause(ctx))
			f.mu.Unlock()
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return f.fail
	}
	f.pushed = append(f.pushed, uri+" "+slices.Concat(paths)[0])
	return nil
}

func (f *fakeNix) pushes() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.pushed)
}

const htop, git = "/nix/store/aaaa-htop", "/nix/store/bbbb-git"

// Each closure goes to every cache once; one that failed goes again the
// next time it is built; Close waits for what is queued.
func TestPusher(t *testing.T) {
	ctx := context.Background()
	nix := &fakeNix{}
	p := New(nix, []string{"file:///a", "file:///b"}, time.Minute)
	p.Push(ctx, []string{htop})
	p.Push(ctx, []string{htop})
	waitIdle(t, p)
	nix.mu.Lock()
	nix.fail = errors.New("cache down")
	nix.mu.Unlock()
	p.Push(ctx, []string{git})
	waitIdle(t, p)
	nix.mu.Lock()
	nix.fail = nil
	nix.mu.Unlock()
	p.Push(ctx, []string{git})
	p.Push(ctx, []string{htop})
	p.Close(ctx)
	want := []string{"file:///a " + htop, "file:///b " + htop, "file:///a " + git, "file:///b " + git}
	if got := nix.pushes(); !slices.Equal(got, want) {
		t.Errorf("pushed %q, want %q", got, want)
	}
	p.Push(ctx, []string{"/nix/store/cccc-jq"})
	if got := nix.pushes(); len(got) != len(want) {
		t.Errorf("pushed after Close: %q", got)
	}
}

// Without caches nothing is pushed; a Close whose context ends stops the
// pushes under way and those queued, at once.
func TestPusherCloseGivesUp(t *testing.T) {
	ctx := context.Background()
	none := &fakeNix{}
	p := New(none, nil, time.Minute)
	p.Push(ctx, []string{htop})
	p.Close(ctx)
	if got := none.pushes(); len(got) != 0 {
		t.Errorf("pushed without caches: %q", got)
	}

	stuck := &fakeNix{gate: make(chan struct{}), entered: make(chan struct{}, 2)}
	p = New(stuck, []string{"http://127.0.0.1:1"}, time.Minute)
	p.Push(ctx, []string{htop})
	p.Push(ctx, []string{git})
	<-stuck.entered
	done, cancel := context.WithCancel(ctx)
	cancel()
	closed := make(chan struct{})
	go func() { p.Close(done); close(closed) }()
	select {
	case <-closed:
	case <-time.After(time.Minute):
		t.Fatal("Close waits for a push that does not end")
	}
	stuck.mu.Lock()
	defer stuck.mu.Unlock()
	if len(stuck.ended) != 1 || !errors.Is(stuck.ended[0], context.Canceled) {
		t.Errorf("the push under way ended by %v, want cancelled once (the queued one not started)", stuck.ended)
	}
}

// A cache that stalls costs one push its timeout, not the queue.
func TestPusherTimeout(t *testing.T) {
	ctx := context.Background()
	stuck := &fakeNix{gate: make(chan struct{})}
	p := New(stuck, []string{"ssh://stalls"}, 10*time.Millisecond)
	defer p.Close(ctx)
	p.Push(ctx, []string{htop})
	p.Push(ctx, []string{git})
	waitIdle(t, p)
	stuck.mu.Lock()
	defer stuck.mu.Unlock()
	if len(stuck.ended) != 2 || !errors.Is(stuck.ended[0], context.DeadlineExceeded) || !errors.Is(stuck.ended[1], context.DeadlineExceeded) {
		t.Errorf("pushes ended by %v, want two timeouts", stuck.ended)
	}
}

// waitIdle waits until p has nothing queued or under way.
func waitIdle(t *testing.T, p *Pusher) {
	t.Helper()
	idle := make(chan struct{})
	go func() { p.pending.Wait(); close(idle) }()
	select {
	case <-idle:
	case <-time.After(time.Minute):
		t.Fatal("pushes do not end")
	}
}
