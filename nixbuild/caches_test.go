package nixbuild

import (
	"context"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// A binary cache that does not answer is left out of the substituter
// settings until it answers again; others (one that asks for credentials
// too), and caches Nix reaches otherwise than by HTTP, stay.
func TestCachesLeaveOutTheDown(t *testing.T) {
	ctx := context.Background()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/nix-cache-info" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte("StoreDir: /nix/store\n"))
	}))
	defer up.Close()
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()
	// One that wants credentials (Nix has them from netrc-file) answers.
	private := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "who are you", http.StatusUnauthorized)
	}))
	defer private.Close()

	c := newCaches(map[string]string{
		"substituters":       up.URL + "?priority=10 " + downURL + " file:///srv/cache",
		"extra-substituters": private.URL,
		"fallback":           "true",
	})
	c.check(ctx)
	got := c.settings()
	want := map[string]string{"substituters": up.URL + "?priority=10 file:///srv/cache"}
	if !maps.Equal(got, want) {
		t.Errorf("settings %q, want %q", got, want)
	}
	b := New(Source{}, WithOptions(map[string]string{"substituters": up.URL + " " + downURL}))
	b.caches.check(ctx)
	if args := b.args("x"); !slices.Equal(args, []string{"--option", "fallback", "true", "--option", "substituters", up.URL, "x"}) {
		t.Errorf("args %q", args)
	}

	// Once the cache answers again, it is back at the next check.
	var answers atomic.Bool
	flaky := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !answers.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
		}
	}))
	defer flaky.Close()
	c = newCaches(map[string]string{"substituters": flaky.URL})
	c.check(ctx)
	if got := c.settings(); got["substituters"] != "" || len(got) != 1 {
		t.Fatalf("settings %q with the cache down", got)
	}
	answers.Store(true)
	c.down[flaky.URL] = time.Now().Add(-cacheRecheck) // a minute later
	c.check(ctx)
	if got := c.settings(); len(got) != 0 {
		t.Errorf("settings %q once the cache answers", got)
	}
}

// Nothing waits on a lock while a cache is asked: settings answer, and a
// build that checks meanwhile (and is cancelled) returns at once, without
// a request of its own.
func TestCachesCheckShared(t *testing.T) {
	var requests atomic.Int64
	asked, gate := make(chan struct{}, 10), make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		asked <- struct{}{}
		<-gate
	}))
	defer slow.Close()
	c := newCaches(map[string]string{"substituters": slow.URL})
	first := make(chan struct{})
	go func() { c.check(context.Background()); close(first) }()
	<-asked
	if got := c.settings(); len(got) != 0 {
		t.Errorf("settings %q while the cache is asked", got)
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	c.check(gone) // joins, and leaves at once
	close(gate)
	<-first
	if n := requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1: the second check asked again", n)
	}
}
