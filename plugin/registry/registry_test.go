package registry

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
)

// newTestRegistry serves a registry whose Nix is missing: every build fails
// at once, which is all the routes need.
func newTestRegistry(t testing.TB) *Registry {
	src, err := nixbuild.PathSource(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	nix := nixbuild.New(src, nixbuild.WithBinDir(t.TempDir()))
	t.Cleanup(func() { nix.Close() })
	return New(plugin.NewImageBuilder(nix))
}

func FuzzRegistryRoutes(f *testing.F) {
	for _, seed := range []struct{ method, path string }{
		{"GET", "/v2/"},
		{"GET", "/v2/shell/htop/manifests/latest?ns=nix.local"},
		{"HEAD", "/v2/htop/manifests/sha256:0123"},
		{"GET", "/v2/htop/blobs/sha256:" + strings.Repeat("a", 64)},
		{"GET", "/v2/../../etc/passwd"},
		{"GET", "/v2/a%2Fb/manifests/latest"},
		{"PUT", "/v2/htop/manifests/latest"},
		{"GET", "/v2/htop${x}/manifests/latest"},
		{"GET", "/v2//manifests/"},
	} {
		f.Add(seed.method, seed.path)
	}
	r := newTestRegistry(f)
	allowed := map[int]bool{200: true, 400: true, 403: true, 404: true, 405: true, 416: true, 429: true, 500: true}
	f.Fuzz(func(t *testing.T, method, path string) {
		req, err := http.NewRequest(method, "http://registry"+path, nil)
		if err != nil {
			return
		}
		w := httptest.NewRecorder()
		r.ServeHTTP(w, req)
		if !allowed[w.Code] {
			t.Fatalf("%s %q: status %d", method, path, w.Code)
		}
		if w.Code >= 400 && !strings.Contains(w.Body.String(), `"errors"`) {
			t.Fatalf("%s %q: %d without an error document: %s", method, path, w.Code, w.Body.String())
		}
	})
}
