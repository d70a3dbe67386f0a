package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// metric reads one sample of the daemon's /metrics.
func (e *env) metric(t testing.TB, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + e.daemon.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	s := bufio.NewScanner(resp.Body)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

func TestMetricsAndHealth(t *testing.T) {
	e := newNixEnv(t)
	resp, err := http.Get("http://" + e.daemon.metrics + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok\n" {
		t.Errorf("healthz: %s %q", resp.Status, body)
	}
	builds := e.metric(t, `nixery_builds_total{result="ok"}`)
	packed := e.metric(t, "nixery_layers_packed_total")
	streamed := e.metric(t, "nixery_bytes_streamed_total")
	e.ctrPull("overlayfs", "nix.local/htop:latest")
	if got := e.metric(t, `nixery_builds_total{result="ok"}`); got <= builds {
		t.Errorf("builds_total ok: %v, before %v", got, builds)
	}
	if got := e.metric(t, "nixery_layers_packed_total"); got <= packed {
		t.Errorf("layers_packed_total: %v, before %v", got, packed)
	}
	if got := e.metric(t, "nixery_bytes_streamed_total"); got <= streamed {
		t.Errorf("bytes_streamed_total: %v, before %v", got, streamed)
	}
	if got := e.metric(t, `nixery_requests_total{code="200",route="manifests"}`); got < 1 {
		t.Errorf("requests_total manifests 200: %v", got)
	}
	if _, err := http.Get("http://" + e.daemon.http + "/v2/nosuchpkg/manifests/latest"); err != nil {
		t.Fatal(err)
	}
	if got := e.metric(t, `nixery_builds_total{result="not_found"}`); got < 1 {
		t.Errorf("builds_total not_found: %v", got)
	}
	// Every log line of a request says which reference it is about.
	if !regexp.MustCompile(`ref="?nix.local/htop:latest`).MatchString(e.daemon.log()) {
		t.Error("the daemon's log does not name the reference")
	}
}

// rawRequest sends request bytes as they are and returns the status code.
func rawRequest(t *testing.T, addr, request string) int {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		return 0
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return 0
	}
	f := strings.Fields(line)
	if len(f) < 2 {
		return 0
	}
	code, _ := strconv.Atoi(f[1])
	return code
}

// Hostile references and requests are answered with the right 4xx and
// never start Nix.
func TestHostileRequests(t *testing.T) {
	bin, calls := countingNix(t)
	e := newNixEnv(t, func(e *env) { e.daemon.nixBin = bin })
	addr := e.daemon.http
	get := func(path string) string {
		return "GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n\r\n"
	}
	long := strings.Repeat("a", 300)
	cases := []struct {
		name, request string
		status        int
	}{
		{"path traversal", get("/v2/../../etc/passwd/manifests/latest"), 400},
		{"traversal in name", get("/v2/htop/../../manifests/latest"), 400},
		{"dot segments", get("/v2/./htop/manifests/latest"), 400},
		{"encoded slash", get("/v2/shell%2Fhtop/manifests/latest"), 400},
		{"encoded dots", get("/v2/%2e%2e/etc/manifests/latest"), 400},
		{"encoded null", get("/v2/htop%00/manifests/latest"), 400},
		{"upper case", get("/v2/HTOP/manifests/latest"), 400},
		{"nix interpolation", get("/v2/htop$%7Bbuiltins.abort%7D/manifests/latest"), 400},
		{"nix interpolation raw", get("/v2/htop${x}/manifests/latest"), 400},
		{"nix string", get(`/v2/"htop"/manifests/latest`), 400},
		{"nix lambda", get("/v2/x:x/manifests/latest"), 400},
		{"nix with", get("/v2/with;htop/manifests/latest"), 400},
		{"nix import", get("/v2/import(/etc)/manifests/latest"), 400},
		{"shell metacharacters", get("/v2/htop;id/manifests/latest"), 400},
		{"backticks", get("/v2/`id`/manifests/latest"), 400},
		{"space", get("/v2/ht%20op/manifests/latest"), 400},
		{"cyrillic confusable", get("/v2/ht%D0%BEp/manifests/latest"), 400},
		{"fullwidth confusable", get("/v2/%EF%BD%88top/manifests/latest"), 400},
		{"over-long name", get("/v2/" + long + "/manifests/latest"), 400},
		{"over-long tag", get("/v2/htop/manifests/" + strings.Repeat("t", 200)), 400},
		{"too many packages", get("/v2/" + strings.TrimSuffix(strings.Repeat("a/", 70), "/") + "/manifests/latest"), 400},
		{"empty segment", get("/v2/htop//git/manifests/latest"), 400},
		{"trailing dot", get("/v2/htop./manifests/latest"), 400},
		{"leading dash", get("/v2/-htop/manifests/latest"), 400},
		{"bad digest", get("/v2/htop/manifests/sha256:../../x"), 400},
		{"bad blob digest", get("/v2/htop/blobs/sha256:1234"), 400},
		{"blob of unknown digest", get("/v2/htop/blobs/sha256:" + strings.Repeat("a", 64)), 404},
		{"manifest by unknown digest", get("/v2/htop/manifests/sha256:" + strings.Repeat("a", 64)), 404},
		{"tag that is not a served revision", get("/v2/htop/manifests/no-such-tag"), 404},
		{"commit that is not a served revision", get("/v2/htop/manifests/0123456789abcdef0123456789abcdef01234567"), 404},
		{"not the API", get("/etc/passwd"), 404},
		{"huge header", "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("x", 200<<10) + "\r\n\r\n", 431},
		{"huge body on PUT", "PUT /v2/htop/manifests/latest HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\nConnection: close\r\n\r\n" + strings.Repeat("x", 1<<16), 405},
		{"POST upload", "POST /v2/htop/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405},
		{"DELETE", "DELETE /v2/htop/manifests/latest HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405},
		{"malformed request line", "GARBAGE\r\n\r\n", 400},
	}
	for _, tc := range cases {
		if got := rawRequest(t, addr, tc.request); got != tc.status {
			t.Errorf("%s: status %d, want %d", tc.name, got, tc.status)
		}
	}
	if n := evaluations(t, calls); n != 0 {
		t.Errorf("hostile requests started Nix %d times", n)
	}
	// And the daemon still serves.
	if got := rawRequest(t, addr, get("/v2/")); got != 200 {
		t.Errorf("after the hostile requests: /v2/ answered %d", got)
	}
}

// On a shared node an allow-list limits what may be built, and a bounded
// queue refuses builds beyond it instead of piling them up.
func TestAllowListAndQueue(t *testing.T) {
	dir := t.TempDir()
	salt := time.Now().String()
	var slow strings.Builder
	for i := 0; i < 4; i++ {
		fmt.Fprintf(&slow, `slow%d = derivation { name = "slow%d"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 3; mkdir $out; (sleep 0.2 &)" ]; salt = %q; };`+"\n", i, i, salt)
	}
	src := `{ system ? builtins.currentSystem, ... }:
import ` + testutil.TestPkgs() + ` { inherit system; } // {
` + slow.String() + `}`
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	e := newNixEnv(t, withPkgs(dir), func(e *env) {
		e.extraNix = map[string]any{"max_builds": 1, "max_queued": 1}
		e.extraImage = map[string]any{"allow": []string{"htop", "slow*"}}
	})
	base := "http://" + e.daemon.http
	status := func(name string) int {
		resp, err := http.Get(base + "/v2/" + name + "/manifests/latest")
		if err != nil {
			t.Error(err)
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := status("htop"); got != 200 {
		t.Errorf("allowed htop: %d", got)
	}
	if got := status("git"); got != 403 {
		t.Errorf("git, not on the allow-list: %d, want 403", got)
	}
	if got := status("htop/git"); got != 403 {
		t.Errorf("htop/git: %d, want 403", got)
	}

	// One building, one waiting; the others are refused at once.
	codes := make([]int, 4)
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 300 * time.Millisecond)
			codes[i] = status(fmt.Sprintf("slow%d", i))
		}()
	}
	wg.Wait()
	ok, busy := 0, 0
	for _, c := range codes {
		switch c {
		case 200:
			ok++
		case 429:
			busy++
		}
	}
	if ok != 2 || busy != 2 {
		t.Errorf("statuses %v, want two 200 and two 429", codes)
	}
}
