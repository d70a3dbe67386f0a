package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

// fakeDaemon builds by sending progress and waiting until the client has
// shown it: a Build whose progress is not streamed as it happens never
// ends (and the test's deadline fails it).
type fakeDaemon struct {
	info Info
	seen chan struct{} // closed by the client when it showed the layer
	err  error
	req  chan BuildRequest
}

func (f *fakeDaemon) Info(context.Context) (Info, error) { return f.info, nil }

func (f *fakeDaemon) Build(ctx context.Context, req BuildRequest) (BuildResult, error) {
	f.req <- req
	if f.err != nil {
		return BuildResult{}, f.err
	}
	progress.Nix(ctx, "building '/nix/store/…-htop-3.2.2.drv'")
	progress.Send(ctx, progress.Event{Kind: progress.KindLayer, Text: "layer 1/2",
		Layer: &progress.Layer{Index: 1, Count: 2, Digest: "sha256:abc", Size: 1 << 40, Paths: 3}})
	select {
	case <-f.seen:
	case <-ctx.Done():
		return BuildResult{}, ctx.Err()
	}
	return BuildResult{Name: req.Ref, Digest: "sha256:def"}, nil
}

func serveFake(t *testing.T, f Daemon) string {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "run", "api.sock")
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, f, socket) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(socket); err == nil {
			return socket
		}
		if time.Now().After(deadline) {
			t.Fatal("the API socket did not appear")
		}
	}
}

func dial(t *testing.T, socket string) *Client {
	t.Helper()
	c, err := Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestInfo(t *testing.T) {
	want := Info{Version: "v1", PackageSource: "path:/srv/pkgs", Host: "nix.local"}
	c := dial(t, serveFake(t, &fakeDaemon{info: want}))
	got, err := c.Info(context.Background())
	if err != nil || got != want {
		t.Fatalf("Info: %+v, %v; want %+v", got, err, want)
	}
	if d := got.Differs(want); d != "" {
		t.Errorf("the same info differs: %s", d)
	}
	other := want
	other.PackageSource = "git:https://example.org/pkgs"
	if d := got.Differs(other); !strings.Contains(d, "https://example.org/pkgs") {
		t.Errorf("another package source: %q", d)
	}
	// A daemon whose images run as another user builds other images; one
	// from before users (no field) builds root's.
	other = want
	other.User = "alice:1000:1000"
	if d := got.Differs(other); !strings.Contains(d, "run as root, not alice:1000:1000") {
		t.Errorf("another user: %q", d)
	}
	if d := other.Differs(want); !strings.Contains(d, "run as alice:1000:1000, not root") {
		t.Errorf("root wanted: %q", d)
	}
	other = want
	other.Platforms = "linux/amd64,linux/arm64"
	if d := got.Differs(other); !strings.Contains(d, "linux/amd64,linux/arm64") {
		t.Errorf("other platforms: %q", d)
	}
}

// The progress of a build reaches the client while the build runs, before
// its result, and the request reaches the daemon as sent.
func TestBuildProgressBeforeResult(t *testing.T) {
	f := &fakeDaemon{seen: make(chan struct{}), req: make(chan BuildRequest, 1)}
	c := dial(t, serveFake(t, f))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var events []progress.Event
	ctx = progress.WithSink(ctx, progress.SinkFunc(func(e progress.Event) {
		events = append(events, e)
		if e.Kind == progress.KindLayer {
			close(f.seen)
		}
	}))
	req := BuildRequest{Ref: "nix.local/htop:latest", Namespace: "k8s.io", Snapshotter: "nix", WithLayers: true, Containerd: "/run/k3s/containerd/containerd.sock"}
	res, err := c.Build(ctx, req)
	if err != nil {
		t.Fatalf("Build: %v (progress not streamed before the result?)", err)
	}
	if got := <-f.req; got != req {
		t.Errorf("the daemon got %+v, want %+v", got, req)
	}
	if res != (BuildResult{Name: req.Ref, Digest: "sha256:def"}) {
		t.Errorf("result %+v", res)
	}
	if len(events) != 2 || events[0].Kind != progress.KindNix || !strings.Contains(events[0].Text, "htop-3.2.2.drv") {
		t.Fatalf("events %+v", events)
	}
	if l := events[1].Layer; l == nil || *l != (progress.Layer{Index: 1, Count: 2, Digest: "sha256:abc", Size: 1 << 40, Paths: 3}) {
		t.Errorf("layer event %+v", events[1])
	}
}

// An error keeps its kind and message across the socket.
func TestBuildErrorKinds(t *testing.T) {
	for _, kind := range []error{errdefs.ErrNotFound, errdefs.ErrInvalidArgument, errdefs.ErrPermissionDenied, errdefs.ErrResourceExhausted, context.DeadlineExceeded} {
		f := &fakeDaemon{req: make(chan BuildRequest, 1), err: fmt.Errorf("packages [nosuch]: %w", kind)}
		c := dial(t, serveFake(t, f))
		_, err := c.Build(context.Background(), BuildRequest{Ref: "nix.local/nosuch", Namespace: "default"})
		if !errors.Is(err, kind) || !strings.Contains(err.Error(), "packages [nosuch]") {
			t.Errorf("daemon's %v arrived as %v", kind, err)
		}
	}
}

// The client calls only root's socket, and says when no daemon is there.
func TestDialRefuses(t *testing.T) {
	if _, err := Dial(filepath.Join(t.TempDir(), "none.sock")); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("no socket: %v", err)
	}
	// A socket file left by a daemon that died.
	stale := filepath.Join(t.TempDir(), "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	c := dial(t, stale)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Info(ctx); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("a socket no daemon listens on: %v", err)
	}

	if os.Geteuid() != 0 {
		t.Skip("needs root to make a socket of another user's")
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	other := filepath.Join(dir, "api.sock")
	if err := os.WriteFile(other, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(other, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := Dial(other); !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "uid 65534") {
		t.Errorf("a socket of uid 65534: %v", err)
	}
}

// floodDaemon sends more progress than any client buffers, then returns.
type floodDaemon struct{ returned chan struct{} }

func (floodDaemon) Info(context.Context) (Info, error) { return Info{}, nil }

func (f floodDaemon) Build(ctx context.Context, req BuildRequest) (BuildResult, error) {
	for i := range 20000 {
		progress.Nix(ctx, fmt.Sprintf("line %d of a long build log", i))
	}
	close(f.returned)
	return BuildResult{Name: req.Ref}, nil
}

// A client that stops reading (Ctrl-Z) does not stall the build it
// watches, which others may share: its events are dropped instead.
func TestBuildStalledClient(t *testing.T) {
	f := floodDaemon{returned: make(chan struct{})}
	c := dial(t, serveFake(t, f))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stalled := true
	ctx = progress.WithSink(ctx, progress.SinkFunc(func(progress.Event) {
		if stalled {
			stalled = false
			select {
			case <-f.returned:
			case <-ctx.Done():
				t.Error("the daemon's build waited for a client that did not read")
			}
		}
	}))
	if res, err := c.Build(ctx, BuildRequest{Ref: "nix.local/htop"}); err != nil || res.Name != "nix.local/htop" {
		t.Errorf("Build: %+v, %v", res, err)
	}
}
