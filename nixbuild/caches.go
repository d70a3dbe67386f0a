package nixbuild

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// substituterKeys are the Nix settings that list binary caches.
var substituterKeys = []string{"substituters", "extra-substituters", "binary-caches", "extra-binary-caches"}

// cacheRecheck is how long a binary cache that did not answer is left
// out: as long as Nix itself disables a cache that failed. One that
// answered is asked again by the next build (one round trip).
const cacheRecheck = time.Minute

// cacheProbeTimeout bounds the question whether a cache answers.
const cacheProbeTimeout = 3 * time.Second

var cachesUnreachable = promauto.NewCounter(prometheus.CounterOpts{
	Namespace: "nixery", Name: "substituters_unreachable_total",
	Help: "Times a binary cache of [nix.options] substituters did not answer, so that Nix ran without it for a minute (building what it would have fetched).",
})

// caches are the HTTP binary caches the configured Nix options name as
// substituters, and which of them answer. Nix waits and retries for a
// cache that does not answer, and then fails the build (Nix 2.8 aborts):
// one that is down is left out of the settings until it answers again, so
// that it only costs the node building for itself.
type caches struct {
	lists map[string][]string // setting → its caches, in order

	mu   sync.Mutex
	down map[string]time.Time // since when a cache has not answered
	// checking is closed when the check under way is done; nil when none
	// is: callers at once share one.
	checking chan struct{}
}

func newCaches(options map[string]string) *caches {
	c := &caches{lists: map[string][]string{}, down: map[string]time.Time{}}
	for _, k := range substituterKeys {
		if v, ok := options[k]; ok {
			c.lists[k] = nixFields(v)
		}
	}
	return c
}

// configured reports whether the options name any binary cache.
func (c *caches) configured() bool {
	for _, list := range c.lists {
		if len(list) > 0 {
			return true
		}
	}
	return false
}

// nixFields splits a list setting as Nix does: at spaces, tabs and line
// ends only.
func nixFields(v string) []string {
	return strings.FieldsFunc(v, func(r rune) bool { return r == ' ' || r == '\t' || r == '\n' || r == '\r' })
}

// check asks the HTTP caches whether they answer (one round trip each, at
// once): those that did, and those that did not a cacheRecheck ago. A
// check under way is joined, not repeated; no lock is held while asking.
func (c *caches) check(ctx context.Context) {
	c.mu.Lock()
	if wait := c.checking; wait != nil {
		c.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
		}
		return
	}
	var uris []string
	for _, list := range c.lists {
		for _, uri := range list {
			if since, down := c.down[uri]; down && time.Since(since) < cacheRecheck {
				continue
			}
			if strings.HasPrefix(uri, "http://") || strings.HasPrefix(uri, "https://") {
				uris = append(uris, uri)
			}
		}
	}
	if len(uris) == 0 {
		c.mu.Unlock()
		return
	}
	done := make(chan struct{})
	c.checking = done
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.checking = nil
		c.mu.Unlock()
		close(done)
	}()

	slices.Sort(uris)
	uris = slices.Compact(uris)
	errs := make([]error, len(uris))
	var wg sync.WaitGroup
	for i, uri := range uris {
		wg.Go(func() { errs[i] = probeCache(ctx, uri) })
	}
	wg.Wait()
	if ctx.Err() != nil {
		return // the caller's end, not the caches'
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, uri := range uris {
		l := log.G(ctx).WithField("substituter", redacted(uri))
		_, wasDown := c.down[uri]
		switch {
		case errs[i] != nil:
			cachesUnreachable.Inc()
			l.WithError(errs[i]).Warn("binary cache does not answer: Nix runs without it for a minute, building here what it would have fetched")
			c.down[uri] = time.Now()
		case wasDown:
			l.Info("binary cache answers again")
			delete(c.down, uri)
		}
	}
}

// redacted is uri without a password, for logs.
func redacted(uri string) string {
	if u, err := url.Parse(uri); err == nil {
		return u.Redacted()
	}
	return "(a substituter that is not a URL)"
}

// probeCache asks the binary cache at uri for its nix-cache-info. Only no
// answer, or a server error, is down: a cache that wants credentials (401,
// 403, which Nix has from netrc-file) answers.
func probeCache(ctx context.Context, uri string) error {
	u, err := url.Parse(uri)
	if err != nil {
		return err
	}
	u.RawQuery = "" // Nix's own parameters (priority=...)
	u.User = nil
	u = u.JoinPath("nix-cache-info")
	ctx, cancel := context.WithTimeout(ctx, cacheProbeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode >= 500 {
		return fmt.Errorf("GET %s: %s: %w", u, resp.Status, errdefs.ErrUnavailable)
	}
	return nil
}

// settings are the substituter settings without the caches that are down,
// for those settings that name one.
func (c *caches) settings() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for k, list := range c.lists {
		up := slices.DeleteFunc(slices.Clone(list), func(uri string) bool {
			_, down := c.down[uri]
			return down
		})
		if len(up) != len(list) {
			out[k] = strings.Join(up, " ")
		}
	}
	return out
}
