package nixbuild

import (
	"context"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// substituterKeys are the Nix settings that list binary caches.
var substituterKeys = []string{"substituters", "extra-substituters"}

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
}

func newCaches(options map[string]string) *caches {
	c := &caches{lists: map[string][]string{}, down: map[string]time.Time{}}
	for _, k := range substituterKeys {
		if v, ok := options[k]; ok {
			c.lists[k] = strings.Fields(v)
		}
	}
	return c
}

// check asks the HTTP caches whether they answer: those that did, and
// those that did not a cacheRecheck ago.
func (c *caches) check(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
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
	for i, uri := range uris {
		l := log.G(ctx).WithField("substituter", uri)
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

// probeCache asks the binary cache at uri for its nix-cache-info.
func probeCache(ctx context.Context, uri string) error {
	u, err := url.Parse(uri)
	if err != nil {
		return err
	}
	u.RawQuery = "" // Nix's own parameters (priority=...)
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
	if resp.StatusCode != http.StatusOK {
		return &url.Error{Op: "GET", URL: u.String(), Err: errStatus(resp.Status)}
	}
	return nil
}

type errStatus string

func (e errStatus) Error() string {
	return "answered " + string(e) + ", not a binary cache's nix-cache-info"
}

// settings are the substituter settings without the caches that are down,
// for those settings that name one.
func (c *caches) settings() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for k, list := range c.lists {
		up := slices.DeleteFunc(slices.Clone(list), func(uri string) bool { _, down := c.down[uri]; return down })
		if len(up) != len(list) {
			out[k] = strings.Join(up, " ")
		}
	}
	return out
}
