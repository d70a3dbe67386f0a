package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// hostsDir writes a certs.d tree that sends nix.local to the daemon's
// endpoint, as contrib/certs.d/nix.local/hosts.toml does on a node.
func (e *env) hostsDir() string {
	e.t.Helper()
	src, err := os.ReadFile(filepath.Join(testutil.RepoRoot(), "contrib/certs.d/nix.local/hosts.toml"))
	if err != nil {
		e.t.Fatal(err)
	}
	dir := filepath.Join(e.t.TempDir(), "certs.d")
	os.MkdirAll(filepath.Join(dir, "nix.local"), 0o755)
	hosts := strings.ReplaceAll(string(src), "127.0.0.1:8484", e.daemon.http)
	if err := os.WriteFile(filepath.Join(dir, "nix.local", "hosts.toml"), []byte(hosts), 0o644); err != nil {
		e.t.Fatal(err)
	}
	return dir
}

// ctrPull pulls ref with ctr through the endpoint.
func (e *env) ctrPull(snapshotter, ref string) {
	e.t.Helper()
	args := []string{"--namespace", "default", "images", "pull", "--hosts-dir", e.hostsDir(), "--snapshotter", snapshotter}
	if testutil.ContainerdBinDir() != "" {
		// containerd 1.7's transfer service does not take ctr's hosts
		// directory: pull in the client, as ctr 1.7 does.
		args = append(args, "--local")
	}
	out, err := e.ctd.Ctr(e.t.Context(), append(args, ref)...).CombinedOutput()
	if err != nil {
		e.t.Fatalf("ctr images pull %s: %v\n%s\ndaemon log:\n%s", ref, err, out, e.daemon.log())
	}
}

// requests counts the endpoint's requests whose path contains part.
func (e *env) requests(part string) int {
	n := 0
	for _, line := range strings.Split(e.daemon.log(), "\n") {
		if strings.Contains(line, `msg="registry request"`) && strings.Contains(line, part) {
			n++
		}
	}
	return n
}

func TestRegistryPull(t *testing.T) {
	e := newNixEnv(t)
	// overlayfs fetches every layer over the endpoint.
	e.ctrPull("overlayfs", "nix.local/shell/htop:latest")
	if out := e.runOn("overlayfs", "nix.local/shell/htop:latest", "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}
	if n := e.requests("/blobs/"); n < 3 {
		t.Errorf("%d blob requests for an overlayfs pull", n)
	}

	// The nix snapshotter makes every layer itself: no layer blob crosses
	// (and glibc & co. were fetched for overlayfs already: count anew).
	// ctr --local (containerd 1.7) fetches every blob before it unpacks.
	log := len(e.daemon.log())
	before := e.requests("/blobs/")
	e.ctrPull("nix", "nix.local/git:latest")
	if testutil.ContainerdBinDir() == "" {
		m, _ := e.manifest(t, "nix.local/git:latest")
		since := e.daemon.log()[log:]
		for _, l := range m.Layers {
			if strings.Contains(since, "/blobs/"+l.Digest.String()) {
				t.Errorf("layer %s fetched for the nix pull", l.Digest)
			}
		}
		if after := e.requests("/blobs/"); after-before != 1 {
			t.Errorf("%d blob requests for a nix pull, want 1 (the config)", after-before)
		}
	}
	if out := e.runOn("nix", "nix.local/git:latest", "git", "--version"); !strings.Contains(out, "git version") {
		t.Errorf("git --version printed %q", out)
	}
}

func TestRegistryErrors(t *testing.T) {
	dir := scriptPackages(t, map[string]string{"broken": "echo 'error: marker-of-the-broken-build' >&2; exit 1"})
	e := newNixEnv(t, withPkgs(dir))
	base := "http://" + e.daemon.http

	// A manifest first, so that its blobs are known.
	resp, err := http.Get(base + "/v2/htop/manifests/latest?ns=nix.local")
	if err != nil {
		t.Fatal(err)
	}
	var manifest struct {
		Config struct{ Digest string }
		Layers []struct {
			Digest string
			Size   int64
		}
	}
	json.NewDecoder(resp.Body).Decode(&manifest)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") == "" || resp.Header.Get("Content-Type") != "application/vnd.oci.image.manifest.v1+json" {
		t.Fatalf("manifest: %s %v", resp.Status, resp.Header)
	}
	digestPath := "/v2/htop/manifests/" + resp.Header.Get("Docker-Content-Digest")
	layer := manifest.Layers[0]

	for _, tc := range []struct {
		method, path string
		header       map[string]string
		status       int
		code, says   string
	}{
		{"GET", "/v2/", nil, 200, "", ""},
		{"HEAD", "/v2/htop/manifests/latest", nil, 200, "", ""},
		{"GET", digestPath, nil, 200, "", ""},
		{"GET", "/v2/Htop/manifests/latest", nil, 400, "NAME_INVALID", "lowercase"},
		{"GET", "/v2/htop..x/manifests/latest", nil, 400, "NAME_INVALID", "invalid reference"},
		{"GET", "/v2/nosuchpkg/alsomissing/manifests/latest", nil, 404, "MANIFEST_UNKNOWN", "could not find Nix packages: [alsomissing nosuchpkg]"},
		{"GET", "/v2/haskellpackages/manifests/latest", nil, 404, "MANIFEST_UNKNOWN", "not Nix packages"},
		{"GET", "/v2/broken/manifests/latest", nil, 500, "UNKNOWN", "marker-of-the-broken-build"},
		{"GET", "/v2/htop/manifests/sha256:" + strings.Repeat("0", 64), nil, 404, "MANIFEST_UNKNOWN", "unknown"},
		{"GET", "/v2/htop/manifests/sha256:zz", nil, 400, "DIGEST_INVALID", "invalid digest"},
		{"GET", "/v2/htop/blobs/sha256:" + strings.Repeat("1", 64), nil, 404, "BLOB_UNKNOWN", "unknown"},
		{"GET", "/v2/htop/blobs/" + manifest.Config.Digest, nil, 200, "", ""},
		{"GET", "/v2/htop/blobs/" + layer.Digest, map[string]string{"Range": "bytes=0-99"}, 206, "", ""},
		{"GET", "/v2/htop/blobs/" + layer.Digest, map[string]string{"Range": fmt.Sprintf("bytes=%d-", layer.Size+10)}, 416, "UNSUPPORTED", "outside"},
		{"PUT", "/v2/htop/manifests/latest", nil, 405, "UNSUPPORTED", "read-only"},
		{"POST", "/v2/htop/blobs/uploads/", nil, 405, "UNSUPPORTED", "read-only"},
		{"DELETE", digestPath, nil, 405, "UNSUPPORTED", "read-only"},
		{"GET", "/v1/_ping", nil, 404, "NAME_UNKNOWN", "not a registry API path"},
	} {
		req, _ := http.NewRequest(tc.method, base+tc.path, nil)
		for k, v := range tc.header {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("%s %s: %d, want %d\n%s", tc.method, tc.path, resp.StatusCode, tc.status, body)
			continue
		}
		if tc.code == "" {
			if tc.status == 206 && len(body) != 100 {
				t.Errorf("range: %d bytes", len(body))
			}
			continue
		}
		var doc struct {
			Errors []struct{ Code, Message string }
		}
		if err := json.Unmarshal(body, &doc); err != nil || len(doc.Errors) != 1 {
			t.Errorf("%s %s: not an error document: %s", tc.method, tc.path, body)
			continue
		}
		if doc.Errors[0].Code != tc.code || !strings.Contains(doc.Errors[0].Message, tc.says) {
			t.Errorf("%s %s: %+v, want %s saying %q", tc.method, tc.path, doc.Errors[0], tc.code, tc.says)
		}
	}
}

// Many concurrent requests for one new image, over HTTP (as CRI and ctr
// make them) and from the CLI, make one Nix build, and all get the image.
func TestRegistryConcurrentRequests(t *testing.T) {
	testutil.RequireNix(t)
	bin, calls := countingNix(t)
	e := newNixEnv(t, func(e *env) { e.daemon.nixBin = bin })
	url := "http://" + e.daemon.http + "/v2/jq/git/manifests/latest?ns=nix.local"

	const n, cli = 32, 8
	var wg sync.WaitGroup
	digests := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i < cli {
				// The CLI builds in the daemon, which serves its source.
				stdout, stderr, err := e.pull("nix.local/git/jq")
				if err != nil {
					errs[i] = fmt.Errorf("%v: %s", err, stderr)
				} else if !strings.Contains(stderr, "building in the daemon") {
					errs[i] = fmt.Errorf("the CLI built by itself: %s", stderr)
				}
				if f := strings.Fields(stdout); len(f) == 2 {
					digests[i] = f[1]
				}
				return
			}
			resp, err := http.Get(url)
			if err != nil {
				errs[i] = err
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				errs[i] = fmt.Errorf("status %s", resp.Status)
			}
			digests[i] = resp.Header.Get("Docker-Content-Digest")
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil || digests[i] != digests[0] {
			t.Errorf("request %d: %v, digest %s (first %s)", i, errs[i], digests[i], digests[0])
		}
	}
	if got := evaluations(t, calls); got != 1 {
		t.Errorf("%d Nix evaluations for %d concurrent requests, want 1", got, n)
	}
}

// A build that outlasts containerd's patience for response headers still
// succeeds: the endpoint answers headers early and the manifest later.
func TestRegistrySlowBuild(t *testing.T) {
	dir := t.TempDir()
	salt := time.Now().String()
	src := `{ system ? builtins.currentSystem, ... }:
let base = import ` + testutil.TestPkgs() + ` { inherit system; }; in base // {
  slow = derivation {
    name = "slow-1.0"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin";
    args = [ "-c" "sleep 3; mkdir -p $out/bin; cp ${base.htop}/bin/htop $out/bin/slow-htop; (sleep 0.2 &)" ];
    salt = "` + salt + `";
  };
  slowbroken = derivation {
    name = "slowbroken-1.0"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin";
    args = [ "-c" "sleep 3; exit 1" ];
    salt = "` + salt + `";
  };
}`
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	e := newNixEnv(t, withPkgs(dir), func(e *env) { e.daemon.earlyHeaders = "1s" })

	// containerd's own client pulls it (HEAD without digest → GET → body).
	e.ctrPull("overlayfs", "nix.local/shell/slow:latest")
	if out := e.runOn("overlayfs", "nix.local/shell/slow:latest", "bash", "-c", "slow-htop --version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("slow image printed %q", out)
	}
	if !strings.Contains(e.daemon.log(), "status=200") {
		t.Error("no request log")
	}

	// A build that fails after the headers went out aborts the response:
	// the client gets an error, never a manifest.
	resp, err := http.Get("http://" + e.daemon.http + "/v2/slowbroken/manifests/latest")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Error("a failed slow build gave a complete response")
	}
	if !strings.Contains(e.daemon.log(), "image build failed after the response had begun") {
		t.Errorf("the early-headers path did not run:\n%s", e.daemon.log())
	}
}

// A client this project did not write, which lists tags before anything:
// skopeo inspects and copies images from the endpoint; tags/list names the
// revisions served, and a tag that is not one is unknown.
func TestRegistrySkopeo(t *testing.T) {
	testutil.RequireCommands(t, "skopeo")
	e := newNixEnv(t)
	image := "docker://" + e.daemon.http + "/shell/htop"
	out, err := exec.Command("skopeo", "inspect", "--tls-verify=false", image).CombinedOutput()
	if err != nil {
		t.Fatalf("skopeo inspect: %v\n%s\ndaemon log:\n%s", err, out, e.daemon.log())
	}
	var inspected struct {
		Digest   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(out, &inspected); err != nil {
		t.Fatalf("skopeo inspect printed %s: %v", out, err)
	}
	m, _ := e.fetchManifest(t, "shell/htop", "latest")
	if inspected.Digest != m.String() || len(inspected.Layers) < 2 || !slices.Equal(inspected.RepoTags, []string{"latest"}) {
		t.Errorf("skopeo inspect: %+v, manifest %s", inspected, m)
	}
	dir := t.TempDir()
	if out, err := exec.Command("skopeo", "copy", "--insecure-policy", "--src-tls-verify=false", image, "oci:"+dir+":htop").CombinedOutput(); err != nil {
		t.Fatalf("skopeo copy: %v\n%s", err, out)
	}
	// (skopeo compresses the layers it writes: their digests change.)
	out, err = exec.Command("skopeo", "inspect", "oci:"+dir+":htop").CombinedOutput()
	var copied struct{ Layers, Env []string }
	if err != nil || json.Unmarshal(out, &copied) != nil || len(copied.Layers) != len(inspected.Layers) || !slices.ContainsFunc(copied.Env, func(e string) bool { return strings.HasPrefix(e, "PATH=") }) {
		t.Errorf("the copy: %v\n%s", err, out)
	}
	for query, want := range map[string]string{"": `{"name":"shell/htop","tags":["latest"]}`, "?n=0": `{"name":"shell/htop","tags":[]}`, "?last=latest": `{"name":"shell/htop","tags":[]}`} {
		resp, err := http.Get("http://" + e.daemon.http + "/v2/shell/htop/tags/list" + query)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.TrimSpace(string(b)) != want {
			t.Errorf("tags/list%s: %s, want %s", query, b, want)
		}
	}
	if out, err := exec.Command("skopeo", "inspect", "--tls-verify=false", image+":no-such-tag").CombinedOutput(); err == nil || !strings.Contains(string(out), "manifest unknown") {
		t.Errorf("an unknown tag: %v\n%s", err, out)
	}
}

// fetchManifest GETs a manifest from the endpoint and returns its digest.
func (e *env) fetchManifest(t *testing.T, name, tag string) (digest.Digest, []byte) {
	t.Helper()
	resp, err := http.Get("http://" + e.daemon.http + "/v2/" + name + "/manifests/" + tag)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("manifest %s:%s: %s %s", name, tag, resp.Status, b)
	}
	return digest.FromBytes(b), b
}

// The OCI distribution-spec conformance suite (read-only pull, with tags
// listed) passes against the endpoint.
func TestRegistryConformance(t *testing.T) {
	testutil.RequireCommands(t, "conformance")
	e := newNixEnv(t)
	d, body := e.fetchManifest(t, "shell/htop", "latest")
	var m ocispec.Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	results := t.TempDir()
	cmd := exec.Command("conformance")
	cmd.Dir = results
	cmd.Env = append(os.Environ(),
		"OCI_REGISTRY="+e.daemon.http, "OCI_TLS=disabled",
		"OCI_REPO1=shell/htop", "OCI_REPO2=htop", "OCI_RESULTS_DIR="+results, "OCI_LOG=warn",
		"OCI_API_PULL=true", "OCI_API_PUSH=false", "OCI_API_TAGS_LIST=true", "OCI_API_REFERRER=false",
		"OCI_API_BLOBS_DELETE=false", "OCI_API_MANIFESTS_DELETE=false", "OCI_API_TAGS_DELETE=false",
		"OCI_RO_DATA_TAGS=latest", "OCI_RO_DATA_MANIFESTS="+d.String(),
		"OCI_RO_DATA_BLOBS="+m.Config.Digest.String()+" "+m.Layers[0].Digest.String())
	// The verdict, not the exit status: this version of the tool crashes
	// after it printed it, writing its results.yaml (upstream's bug: a
	// nil data entry when nothing was pushed).
	out, _ := cmd.CombinedOutput()
	verdict := regexp.MustCompile(`(?m)^OCI Conformance Result: (\w+)$`).FindStringSubmatch(string(out))
	failed := regexp.MustCompile(`(?m)^\s*(FAIL|Error)\.+:\s*(\d+)$`).FindAllStringSubmatch(string(out), -1)
	if verdict == nil || verdict[1] != "Pass" || len(failed) != 2 || failed[0][2] != "0" || failed[1][2] != "0" {
		t.Errorf("conformance:\n%s", out)
	}
}

// With [registry] unpack_into naming a namespace, a pull through the
// endpoint there (ctr's, into overlayfs) finds every layer's snapshot made
// (linked to the store) when the manifest is answered, and fetches no
// layer blob. A target that cannot be unpacked into (a snapshotter
// containerd lacks) only costs its pulls the layers: said, counted, and
// the pull works.
func TestRegistryUnpackInto(t *testing.T) {
	e := newNixEnv(t, func(e *env) { e.daemon.unpackInto = []string{"default", "other/nosuch"} })
	const ref = "nix.local/shell/htop:latest"
	start := time.Now()
	e.ctrPull("overlayfs", ref)
	took := time.Since(start)
	if out := e.runOn("overlayfs", ref, "htop", "--version"); !strings.Contains(out, htopVersion()) {
		t.Errorf("htop --version printed %q", out)
	}
	m, _ := e.manifest(t, ref)
	if testutil.ContainerdBinDir() == "" { // ctr 1.7 --local fetches every blob first
		for _, l := range m.Layers {
			if e.requests("/blobs/"+l.Digest.String()) > 0 {
				t.Errorf("layer %s crossed the endpoint", l.Digest)
			}
		}
		if n := e.requests("/blobs/"); n != 1 {
			t.Errorf("%d blob requests, want 1 (the config)", n)
		}
	}
	if n := e.metric(t, "nixery_staging_failures_total"); n < 1 {
		t.Errorf("nixery_staging_failures_total %v after a target with no such snapshotter", n)
	}
	if !strings.Contains(e.daemon.log(), "could not unpack the image for pulls through the endpoint") || !strings.Contains(e.daemon.log(), "other/nosuch") {
		t.Errorf("no warning about the target that failed:\n%s", e.daemon.log())
	}
	if leases := e.ctd.Ctr(t.Context(), "--namespace", "other", "leases", "ls", "-q"); leases != nil {
		if out, _ := leases.Output(); strings.TrimSpace(string(out)) != "" {
			t.Errorf("the failed target left leases: %s", out)
		}
	}
	t.Logf("ctr images pull %s through the endpoint, unpacked there: %s", ref, took.Round(time.Millisecond))
}
