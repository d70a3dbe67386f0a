package integration

import (
	"compress/gzip"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	nixlayer "github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
)

// nixeryStyle provisions the image whose layers m describes the way Nixery
// does: every layer packed and gzipped at the default level, served by a
// registry over loopback HTTP, pulled and unpacked by containerd. It returns
// the name the image got.
func nixeryStyle(tb testing.TB, e *env, m ocispec.Manifest, cfg ocispec.Image) string {
	tb.Helper()
	dir := tb.TempDir()
	blobs := map[digest.Digest]string{}
	put := func(b []byte) digest.Digest {
		d := digest.FromBytes(b)
		p := filepath.Join(dir, d.Encoded())
		if err := os.WriteFile(p, b, 0o644); err != nil {
			tb.Fatal(err)
		}
		blobs[d] = p
		return d
	}
	var layers []ocispec.Descriptor
	cfg.RootFS.DiffIDs = nil
	for _, l := range m.Layers {
		layer := &nixlayer.Layer{Paths: storePaths(l.Annotations)}
		if len(layer.Paths) == 0 {
			layer = &nixlayer.Layer{Paths: symlinkPaths(l.Annotations), Symlinks: true}
		}
		f, err := os.CreateTemp(dir, "layer")
		if err != nil {
			tb.Fatal(err)
		}
		gzDigest, diffID := digest.Canonical.Digester(), digest.Canonical.Digester()
		counter := &countWriter{}
		zw := gzip.NewWriter(io.MultiWriter(f, gzDigest.Hash(), counter))
		if err := layer.WriteTar(io.MultiWriter(zw, diffID.Hash())); err != nil {
			tb.Fatal(err)
		}
		zw.Close()
		f.Close()
		blobs[gzDigest.Digest()] = f.Name()
		layers = append(layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: gzDigest.Digest(), Size: counter.n})
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, diffID.Digest())
	}
	cfgBytes, _ := json.Marshal(cfg)
	cfgDigest := put(cfgBytes)
	manifest, _ := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cfgDigest, Size: int64(len(cfgBytes))},
		Layers: layers,
	})
	manifestDigest := put(manifest)

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v2/":
			w.WriteHeader(http.StatusOK)
		case strings.Contains(r.URL.Path, "/manifests/"):
			w.Header().Set("Content-Type", ocispec.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", manifestDigest.String())
			http.ServeFile(w, r, blobs[manifestDigest])
		case strings.Contains(r.URL.Path, "/blobs/"):
			d := digest.Digest(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:])
			if p, ok := blobs[d]; ok {
				w.Header().Set("Docker-Content-Digest", d.String())
				http.ServeFile(w, r, p)
				return
			}
			http.NotFound(w, r)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	hosts := filepath.Join(dir, "certs.d", "nixery.test")
	os.MkdirAll(hosts, 0o755)
	os.WriteFile(filepath.Join(hosts, "hosts.toml"), []byte("server = \""+srv.URL+"\"\n[host.\""+srv.URL+"\"]\n  capabilities = [\"pull\", \"resolve\"]\n"), 0o644)
	name := "nixery.test/shell/big:latest"
	out, err := e.ctd.Ctr(tb.Context(), "--namespace", "default", "images", "pull", "--hosts-dir", filepath.Dir(hosts),
		"--snapshotter", "overlayfs", name).CombinedOutput()
	if err != nil {
		tb.Fatalf("pull from the Nixery-style registry: %v\n%s", err, out)
	}
	return name
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return len(p), nil
}
