// Package push uploads the closures of the images a node builds to Nix
// binary caches, in the background, so that every other node configured
// with such a cache as a substituter fetches what this one built instead
// of building it again: one build serves the fleet, through the engine Nix
// already has.
package push

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// Nix is what a Pusher needs of Nix (a *nixbuild.Builder).
type Nix interface {
	// Hold keeps store paths from the garbage collector until released.
	Hold(ctx context.Context, paths []string) (*nixbuild.Roots, error)
	// Push copies paths and their closure to the store at uri.
	Push(ctx context.Context, uri string, paths []string) error
}

// queueLength bounds the closures waiting to be pushed; more are dropped
// (and counted): a cache that is slow must not hold the node's memory.
const queueLength = 64

// seenLimit bounds the closures remembered as pushed; past it the record
// starts again (a closure pushed twice costs Nix one query per path).
const seenLimit = 4096

var pushes = promauto.NewCounterVec(prometheus.CounterOpts{
	Namespace: "nixery", Name: "pushes_total",
	Help: "Closures pushed to a binary cache ([nix] push_to) by result: ok, failed, dropped (the queue was full).",
}, []string{"result"})

// Pusher pushes closures to its caches one after the other, never in the
// way of the pull that built them: a failure is logged and counted.
type Pusher struct {
	nix     Nix
	to      []string
	timeout time.Duration
	jobs    chan job
	// ctx ends the pushes under way when the Pusher closes.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// pending counts the jobs queued or under way.
	pending sync.WaitGroup

	mu     sync.Mutex
	seen   map[string]bool
	closed bool
}

type job struct {
	key   string
	paths []string
	log   *log.Entry
}

// New returns a Pusher to the Nix store URIs to, each push to one of them
// bounded by timeout (a cache that stalls must not stop the queue); with
// none it pushes nothing.
func New(nix Nix, to []string, timeout time.Duration) *Pusher {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pusher{nix: nix, to: to, timeout: timeout, jobs: make(chan job, queueLength), ctx: ctx, cancel: cancel,
		done: make(chan struct{}), seen: map[string]bool{}}
	go p.work()
	return p
}

// Targets are the Nix store URIs the Pusher pushes to.
func (p *Pusher) Targets() []string { return slices.Clone(p.to) }

// Push queues the closure of paths (an image's packages) to be pushed to
// every cache, unless it was pushed already. It does not wait.
func (p *Pusher) Push(ctx context.Context, paths []string) {
	if len(p.to) == 0 || len(paths) == 0 {
		return
	}
	paths = slices.Sorted(slices.Values(paths))
	key := strings.Join(paths, " ")
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen[key] || p.closed {
		return
	}
	j := job{key: key, paths: paths, log: log.G(ctx)}
	p.pending.Add(1) // before the worker can take it
	select {
	case p.jobs <- j:
		if len(p.seen) >= seenLimit {
			clear(p.seen)
		}
		p.seen[key] = true
	default:
		p.pending.Done()
		pushes.WithLabelValues("dropped").Inc()
		j.log.WithField("to", p.to).Warn("not pushing the image's closure to the binary caches: too many pushes are waiting (the caches are slow); nodes will build it themselves")
	}
}

func (p *Pusher) work() {
	defer close(p.done)
	for {
		select {
		case j := <-p.jobs:
			if p.ctx.Err() == nil { // else given up, as those still queued
				p.push(j)
			}
			p.pending.Done()
		case <-p.ctx.Done():
			for range len(p.jobs) { // Close refuses more
				<-p.jobs
				p.pending.Done()
			}
			return
		}
	}
}

// push holds j's paths (the build that made them may have released them)
// and copies them to each cache.
func (p *Pusher) push(j job) {
	ctx := log.WithLogger(p.ctx, j.log)
	roots, err := p.nix.Hold(ctx, j.paths)
	if err != nil {
		p.failed(ctx, j, "", err)
		return
	}
	defer roots.Release()
	for _, uri := range p.to {
		start := time.Now()
		pctx, cancel := context.WithTimeoutCause(ctx, p.timeout, fmt.Errorf("the push took longer than %s: %w", p.timeout, context.DeadlineExceeded))
		err := p.nix.Push(pctx, uri, j.paths)
		if err != nil && pctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("%w (%w)", context.Cause(pctx), err)
		}
		cancel()
		if err != nil {
			p.failed(ctx, j, uri, err)
			continue
		}
		pushes.WithLabelValues("ok").Inc()
		log.G(ctx).WithField("to", uri).WithField("packages", len(j.paths)).WithField("took", time.Since(start).Round(time.Millisecond)).
			Info("pushed the image's closure to the binary cache")
	}
}

// failed reports a push that failed (to uri, or "" for every cache) and
// forgets it was queued, so that the next build of the image tries again.
func (p *Pusher) failed(ctx context.Context, j job, uri string, err error) {
	if p.ctx.Err() != nil {
		return // closing
	}
	pushes.WithLabelValues("failed").Inc()
	l := log.G(ctx).WithError(err)
	if uri != "" {
		l = l.WithField("to", uri)
	}
	l.Warn("pushing the image's closure to the binary cache failed; the pull is not affected, and nodes that would have substituted it build it")
	p.mu.Lock()
	delete(p.seen, j.key)
	p.mu.Unlock()
}

// Close waits for the pushes queued until ctx ends, then stops those
// still going; later pushes are refused.
func (p *Pusher) Close(ctx context.Context) {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	idle := make(chan struct{})
	go func() { p.pending.Wait(); close(idle) }()
	select {
	case <-idle:
	case <-ctx.Done():
	}
	p.cancel()
	<-p.done
	<-idle
}
