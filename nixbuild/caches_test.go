package nixbuild

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// A binary cache that does not answer is left out of the substituter
// settings until it answers again; others, and caches Nix reaches
// otherwise than by HTTP, stay.
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
	notACache := httptest.NewServer(http.NotFoundHandler())
	defer notACache.Close()

	c := newCaches(map[string]string{
		"substituters":       up.URL + "?priority=10 " + downURL + " file:///srv/cache",
		"extra-substituters": notACache.URL,
		"fallback":           "true",
	})
	c.check(ctx)
	got := c.settings()
	want := map[string]string{"substituters": up.URL + "?priority=10 file:///srv/cache", "extra-substituters": ""}
	if len(got) != len(want) || got["substituters"] != want["substituters"] || got["extra-substituters"] != "" {
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
