// Package listen is how the daemon listens: unix sockets only root and its
// group may use, TCP on loopback unless TLS with client certificates says
// who asks, and HTTP servers with timeouts and per-client connection
// bounds.
package listen

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"google.golang.org/grpc"
)

const (
	// readTimeout bounds reading a request (they have no bodies) and
	// idleTimeout how long a kept-alive connection may wait for its next.
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	idleTimeout       = 60 * time.Second
	// WriteStall is how long one write to a client may block: a blob of
	// any size is served as long as the client keeps reading.
	WriteStall = 60 * time.Second
	// StopGrace is how long in-flight requests get to finish on shutdown.
	StopGrace = 10 * time.Second
	// maxConnsPerClient bounds the connections of one client address (on
	// loopback: every local user and kubelet): beyond it the client's idle
	// connections are closed first, then new ones refused.
	maxConnsPerClient = 64
)

// TLSFiles are the certificate, key and client CA of a TLS listener.
type TLSFiles struct {
	Cert, Key string
	// ClientCA, when set, makes clients authenticate with a certificate
	// it signed (mutual TLS).
	ClientCA string
}

func (f TLSFiles) config() (*tls.Config, error) {
	if f.Cert == "" && f.Key == "" && f.ClientCA == "" {
		return nil, nil
	}
	if f.Cert == "" || f.Key == "" {
		return nil, fmt.Errorf("TLS needs both a certificate and a key (tls_cert %q, tls_key %q): %w", f.Cert, f.Key, errdefs.ErrInvalidArgument)
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if f.ClientCA != "" {
		pem, err := os.ReadFile(f.ClientCA)
		if err != nil {
			return nil, fmt.Errorf("TLS client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS client CA %s holds no PEM certificate: %w", f.ClientCA, errdefs.ErrInvalidArgument)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// Loopback reports whether a host:port listens on this host only.
func Loopback(address string) bool {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// TCP listens on address: on loopback as configured; beyond this
// host only with TLS and client certificates, since the endpoint has no
// other way to tell who asks.
func TCP(what, address string, files TLSFiles) (net.Listener, error) {
	cfg, err := files.config()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if !Loopback(address) && (cfg == nil || cfg.ClientCAs == nil) {
		return nil, fmt.Errorf("%s: %s is not a loopback address: serving beyond this host needs tls_cert, tls_key and client_ca (clients authenticate with certificates), or listen on 127.0.0.1: %w",
			what, address, errdefs.ErrInvalidArgument)
	}
	l, err := net.Listen("tcp", address)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if cfg != nil {
		l = tls.NewListener(l, cfg)
	}
	return l, nil
}

// Unix listens on a unix socket that only root and its group may
// use: a directory it creates is 0700, the socket 0660. A stale socket from
// a process that died is removed; a live one is an error.
func Unix(address string) (net.Listener, error) {
	dir := filepath.Dir(address)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("socket directory: %w", err)
		}
	}
	if fi, err := os.Lstat(address); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", address)
		}
		if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another process is serving on %s", address)
		}
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", address, err)
	}
	if err := os.Chmod(address, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket permissions: %w", err)
	}
	return l, nil
}

// Serve serves h on every listener until ctx ends, then shuts down
// gracefully. Requests carry ctx (and its logger). Connections of one
// client are bounded on TCP listeners (limits).
func Serve(ctx context.Context, what string, h http.Handler, listeners ...net.Listener) error {
	limits := newConnLimits(maxConnsPerClient)
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ConnState:         limits.track,
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), StopGrace)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	served := make(chan error, len(listeners))
	for _, l := range listeners {
		log.G(ctx).WithField("address", l.Addr().String()).Info("serving " + what)
		go func() { served <- srv.Serve(l) }()
	}
	var errs []error
	for range listeners {
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			errs = append(errs, err)
			_ = srv.Close()
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// connLimits bounds the open connections of each client address (all of
// loopback counting as one). When a client reaches the bound, its idle
// connections are closed (kept-alive connections are cheap to reopen); if
// none is idle, the new connection is closed at once. This bounds what the
// daemon holds, not who gets in: on loopback a local user who keeps the
// bound busy delays other local clients. Unix-socket clients (root) are
// not bounded.
type connLimits struct {
	max   int
	mu    sync.Mutex
	conns map[string]map[net.Conn]http.ConnState
}

func newConnLimits(max int) *connLimits {
	return &connLimits{max: max, conns: map[string]map[net.Conn]http.ConnState{}}
}

// clientOf is the bucket of a connection: its address, or "loopback" for
// all of 127.0.0.0/8 and ::1, which any local user can pick from.
func clientOf(c net.Conn) (string, bool) {
	addr, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return "", false
	}
	if addr.IP.IsLoopback() {
		return "loopback", true
	}
	return addr.IP.String(), true
}

func (l *connLimits) track(c net.Conn, state http.ConnState) {
	client, ok := clientOf(c)
	if !ok {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	conns := l.conns[client]
	switch state {
	case http.StateNew:
		if conns == nil {
			conns = map[net.Conn]http.ConnState{}
			l.conns[client] = conns
		}
		if len(conns) >= l.max {
			shed := 0
			for other, st := range conns {
				if st == http.StateIdle {
					_ = other.Close()
					delete(conns, other)
					if shed++; len(conns) < l.max/2 {
						break
					}
				}
			}
			if len(conns) >= l.max {
				_ = c.Close()
				return
			}
		}
		conns[c] = state
	case http.StateActive, http.StateIdle:
		if _, ok := conns[c]; ok {
			conns[c] = state
		}
	case http.StateHijacked, http.StateClosed:
		delete(conns, c)
		if len(conns) == 0 {
			delete(l.conns, client)
		}
	}
}

// StallWriter sets a write deadline before each write: a client that stops
// reading is cut off after stall, however large what it asked for.
type StallWriter struct {
	http.ResponseWriter
	rc    *http.ResponseController
	stall time.Duration
}

// NewStallWriter cuts off a client of w that does not read for stall.
func NewStallWriter(w http.ResponseWriter, stall time.Duration) *StallWriter {
	return &StallWriter{ResponseWriter: w, rc: http.NewResponseController(w), stall: stall}
}

func (w *StallWriter) Write(b []byte) (int, error) {
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.stall))
	return w.ResponseWriter.Write(b)
}

// ServeGRPC serves srv on l until ctx ends, then stops it, letting calls
// under way end for StopGrace.
func ServeGRPC(ctx context.Context, what string, srv *grpc.Server, l net.Listener) error {
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	log.G(ctx).WithField("address", l.Addr().String()).Info("serving " + what)
	select {
	case err := <-served:
		return fmt.Errorf("serving %s on %s: %w", what, l.Addr(), err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(StopGrace):
		srv.Stop()
	}
	return nil
}
