package integration

import (
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// binaryCache serves a file:// Nix binary cache directory over HTTP on
// loopback, as any static file server can, counting the NARs it serves.
type binaryCache struct {
	dir  string
	url  string
	nars atomic.Int64
	srv  *http.Server
}

func newBinaryCache(t *testing.T) *binaryCache {
	t.Helper()
	c := &binaryCache{dir: t.TempDir()}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	files := http.FileServer(http.Dir(c.dir))
	c.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/nar/") {
			c.nars.Add(1)
		}
		files.ServeHTTP(w, r)
	})}
	go c.srv.Serve(l)
	t.Cleanup(func() { c.srv.Close() })
	c.url = "http://" + l.Addr().String()
	return c
}

// One build serves the fleet: three nodes on this machine, each with a
// /nix, containerd and daemon of its own. Node 1 builds an image and
// pushes its closure to a binary cache (a file:// cache, signed), served
// over HTTP on loopback; nodes 2 and 3, configured with that cache as
// their substituter, pull the same reference with no builder run and get
// the same manifest. With the cache stopped, a node still builds.
func TestFleet(t *testing.T) {
	testutil.RequireNix(t)
	cache := newBinaryCache(t)
	keys := t.TempDir()
	secret, public := filepath.Join(keys, "secret"), filepath.Join(keys, "public")
	if out, err := exec.Command("nix-store", "--generate-binary-cache-key", "fleet-test-1", secret, public).CombinedOutput(); err != nil {
		t.Fatalf("generating the cache's key: %v\n%s", err, out)
	}
	publicKey, err := os.ReadFile(public)
	if err != nil {
		t.Fatal(err)
	}

	const ref = "nix.local/shell/git"
	node := func(nix map[string]any) *env {
		return newNixEnv(t, withOwnNix(), func(e *env) { e.extraNix = nix })
	}
	substituting := testutil.NixOptions()
	substituting["substituters"] = cache.url
	substituting["trusted-public-keys"] = strings.TrimSpace(string(publicKey))
	nodes := []*env{
		node(map[string]any{"push_to": []string{"file://" + cache.dir + "?compression=none"}, "push_secret_key": secret}),
		node(map[string]any{"options": substituting}),
		node(map[string]any{"options": substituting}),
	}
	const built, pushed = "nixery_nix_derivations_built_total", `nixery_pushes_total{result="ok"}`

	var digests []string
	var took []time.Duration
	for i, e := range nodes {
		start := time.Now()
		digests = append(digests, e.mustPull("--snapshotter", "overlayfs", ref))
		took = append(took, time.Since(start))
		if i == 0 {
			// The push runs after the pull, in the background.
			deadline := time.Now().Add(2 * time.Minute)
			for e.metric(t, pushed) < 1 {
				if time.Now().After(deadline) {
					t.Fatalf("node 1 did not push the closure; its log:\n%s", e.daemon.log())
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		if out := e.runOn("overlayfs", ref, "git", "--version"); !strings.Contains(out, "git version") {
			t.Errorf("node %d: git --version printed %q", i+1, out)
		}
	}
	runs := []float64{nodes[0].metric(t, built), nodes[1].metric(t, built), nodes[2].metric(t, built)}
	t.Logf("builder runs per node: %v; pull took %v on node 1, %v and %v on nodes 2 and 3 (%.2f and %.2f × node 1); %d NARs served",
		runs, took[0].Round(time.Millisecond), took[1].Round(time.Millisecond), took[2].Round(time.Millisecond),
		float64(took[1])/float64(took[0]), float64(took[2])/float64(took[0]), cache.nars.Load())
	if runs[0] == 0 || runs[1] != 0 || runs[2] != 0 {
		t.Errorf("builder runs per node %v, want some, 0, 0", runs)
	}
	if cache.nars.Load() == 0 {
		t.Error("no NAR was fetched from the cache")
	}
	for i, d := range digests {
		if d != digests[0] {
			t.Errorf("node %d's manifest is %s, node 1's %s", i+1, d, digests[0])
		}
	}

	// A cache that is down only makes a node build for itself.
	cache.srv.Close()
	e := nodes[2]
	e.mustPull("--snapshotter", "overlayfs", "nix.local/jq")
	if n := e.metric(t, built); n == 0 {
		t.Error("node 3 built nothing for an image the cache never had")
	}
	if n := e.metric(t, "nixery_substituters_unreachable_total"); n == 0 {
		t.Error("the cache that is down was not noticed")
	}
	if out := e.runOn("overlayfs", "nix.local/jq", "jq", "--version"); !strings.Contains(out, "jq-") {
		t.Errorf("jq --version printed %q", out)
	}
}
