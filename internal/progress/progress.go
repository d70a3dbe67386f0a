// Package progress carries what a long request shows the person who made
// it: Nix's log, the steps of a build, each layer as it is made. Events go
// to the Sink of the request's context, so that the CLI building by itself
// and the daemon building for the CLI report the same events, and work
// shared by several requests (one Nix build for everyone who asks for an
// image) reports to each of them.
package progress

import (
	"context"
	"fmt"
	"sync"
)

// Kind says what an event reports.
type Kind string

const (
	// KindNix is one line of Nix's log.
	KindNix Kind = "nix"
	// KindStep is a step of the request: packages, closure, registration.
	KindStep Kind = "step"
	// KindLayer is a layer made or found.
	KindLayer Kind = "layer"
)

// Event is one thing to show. Text is what a person reads, whatever the
// kind; a layer event describes its layer in Layer too.
type Event struct {
	Kind  Kind   `json:"kind"`
	Text  string `json:"text"`
	Layer *Layer `json:"layer,omitempty"`
}

// Layer describes a layer event: the index-th of count layers.
type Layer struct {
	Index  int    `json:"index"`
	Count  int    `json:"count"`
	Digest string `json:"digest"`
	Size   int64  `json:"size,string"` // a string, as proto3 JSON writes int64
	// Paths is how many store paths it holds; 0 for the symlink layer.
	Paths int `json:"paths"`
}

// Sink receives events. Its Event may be called from several goroutines
// at once, and must not block for long: Nix's log waits for it.
type Sink interface {
	Event(Event)
}

// SinkFunc is a Sink of a function.
type SinkFunc func(Event)

// Event implements Sink.
func (f SinkFunc) Event(e Event) { f(e) }

type sinkKey struct{}

// WithSink returns a context whose events go to s.
func WithSink(ctx context.Context, s Sink) context.Context {
	return context.WithValue(ctx, sinkKey{}, s)
}

// Watched reports whether someone receives the events of ctx: whether a
// person sees what Nix logs as it comes (an error then need not repeat it).
func Watched(ctx context.Context) bool {
	switch s := ctx.Value(sinkKey{}).(type) {
	case *fanout:
		return s.watched()
	case Sink:
		return true
	}
	return false
}

// Send sends e to the sink of ctx, if it has one.
func Send(ctx context.Context, e Event) {
	if s, ok := ctx.Value(sinkKey{}).(Sink); ok {
		s.Event(e)
	}
}

// Nix sends one line of Nix's log.
func Nix(ctx context.Context, line string) { Send(ctx, Event{Kind: KindNix, Text: line}) }

// Step sends a step, formatted as fmt.Sprintf does.
func Step(ctx context.Context, format string, args ...any) {
	if Watched(ctx) {
		Send(ctx, Event{Kind: KindStep, Text: fmt.Sprintf(format, args...)})
	}
}

// Shared sends the events of work that several requests share to every
// one of them while it waits: the work runs in the context of whichever
// request started it, and requests that join later see what comes after.
// The zero value is ready to use.
type Shared struct {
	mu    sync.Mutex
	works map[string]*fanout
}

// fanout is the sink of one shared work.
type fanout struct {
	mu    *sync.Mutex
	sinks map[*Sink]Sink // by the joining request's own entry
	refs  int            // requests joined, watching or not
}

// watched reports whether a person receives f's events: a watcher that is
// itself shared work (a build waiting for the Nix build it shares) counts
// only if it is watched.
func (f *fanout) watched() bool {
	for _, s := range f.snapshot() {
		if inner, ok := s.(*fanout); !ok || inner.watched() {
			return true
		}
	}
	return false
}

func (f *fanout) snapshot() []Sink {
	f.mu.Lock()
	defer f.mu.Unlock()
	sinks := make([]Sink, 0, len(f.sinks))
	for _, s := range f.sinks {
		sinks = append(sinks, s)
	}
	return sinks
}

func (f *fanout) Event(e Event) {
	for _, s := range f.snapshot() {
		s.Event(e)
	}
}

// Join makes the request of ctx a watcher of the work key until leave is
// called, and returns the context that work is to run in: its events go
// to every watcher of key. A request without a sink watches nothing, but
// its context still carries the work's events to the others.
func (s *Shared) Join(ctx context.Context, key string) (work context.Context, leave func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.works == nil {
		s.works = map[string]*fanout{}
	}
	f, ok := s.works[key]
	if !ok {
		f = &fanout{sinks: map[*Sink]Sink{}, mu: &s.mu}
		s.works[key] = f
	}
	f.refs++
	entry := new(Sink)
	if own, ok := ctx.Value(sinkKey{}).(Sink); ok {
		f.sinks[entry] = own
	}
	return WithSink(ctx, f), sync.OnceFunc(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(f.sinks, entry)
		if f.refs--; f.refs == 0 {
			delete(s.works, key)
		}
	})
}

// Buffered is a Sink that never blocks: events wait, at most a given
// number, for a goroutine that hands them to the sink behind it; more are
// dropped. A watcher that does not read (a client stopped with Ctrl-Z, a
// pipe nobody drains) misses events instead of stalling the work it
// watches, which others may share.
type Buffered struct {
	mu      sync.Mutex
	queue   chan Event
	closed  bool
	dropped int
	done    chan struct{}
}

// NewBuffered returns a Buffered sink of to that holds up to n events.
func NewBuffered(to Sink, n int) *Buffered {
	b := &Buffered{queue: make(chan Event, n), done: make(chan struct{})}
	go func() {
		defer close(b.done)
		for e := range b.queue {
			to.Event(e)
		}
	}()
	return b
}

// Event implements Sink.
func (b *Buffered) Event(e Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return // the watcher is done: the work outlives it
	}
	select {
	case b.queue <- e:
	default:
		b.dropped++
	}
}

// Close delivers the events that wait, drops any that come later, and
// returns how many were dropped.
func (b *Buffered) Close() int {
	b.mu.Lock()
	if !b.closed {
		b.closed = true
		close(b.queue)
	}
	b.mu.Unlock()
	<-b.done
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.dropped
}

// Bytes writes a size for a person: 4.2 MiB.
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
