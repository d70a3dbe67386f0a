package listen

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// A client that stops reading is cut off after the stall, while one that
// reads slowly gets everything.
func TestStallWriter(t *testing.T) {
	done := make(chan error, 2)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := NewStallWriter(w, 200*time.Millisecond)
		chunk := make([]byte, 64<<10)
		var err error
		for i := 0; i < 1024 && err == nil; i++ { // 64 MiB: more than socket buffers
			_, err = sw.Write(chunk)
		}
		done <- err
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Serve(ctx, "test", handler, l)

	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case err := <-done:
		if err == nil {
			t.Error("64 MiB written to a client that reads nothing")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the handler is still writing to a client that reads nothing")
	}

	resp, err := http.Get("http://" + l.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if n != 64<<20 || <-done != nil {
		t.Errorf("a reading client got %d bytes", n)
	}
}

// Beyond its bound, a client's idle connections are closed first, then
// new ones.
func TestConnLimits(t *testing.T) {
	l := newConnLimits(4)
	var conns []*fakeConn
	for i := range 4 {
		c := &fakeConn{port: i}
		conns = append(conns, c)
		l.track(c, http.StateNew)
	}
	l.track(conns[0], http.StateIdle)
	l.track(conns[1], http.StateActive)
	extra := &fakeConn{port: 9}
	l.track(extra, http.StateNew)
	if !conns[0].closed || conns[1].closed || extra.closed {
		t.Errorf("closed: idle %v, active %v, new %v", conns[0].closed, conns[1].closed, extra.closed)
	}
	// Nothing idle: the new one is refused.
	l.track(&fakeConn{port: 10}, http.StateNew)
	refused := &fakeConn{port: 11}
	l.track(refused, http.StateNew)
	if !refused.closed {
		t.Error("a connection beyond the bound, none idle, was kept")
	}
	// Any loopback address is the same client; another host has its own
	// bound.
	spoofed := &fakeConn{port: 12, ip: "127.3.4.5"}
	l.track(spoofed, http.StateNew)
	if !spoofed.closed {
		t.Error("another loopback address escaped the bound")
	}
	other := &fakeConn{port: 13, ip: "192.0.2.1"}
	l.track(other, http.StateNew)
	if other.closed {
		t.Error("another host's connection was refused")
	}
}

type fakeConn struct {
	net.Conn
	ip     string
	port   int
	closed bool
}

func (c *fakeConn) RemoteAddr() net.Addr {
	ip := c.ip
	if ip == "" {
		ip = "127.0.0.1"
	}
	return &net.TCPAddr{IP: net.ParseIP(ip), Port: c.port}
}

func (c *fakeConn) Close() error { c.closed = true; return nil }

func TestListenTCPRefusesTheNetwork(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", ":0", "[::]:0", "192.0.2.1:0"} {
		if _, err := TCP("test", addr, TLSFiles{}); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "client_ca") {
			t.Errorf("%s: %v", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:0", "localhost:0"} {
		l, err := TCP("test", addr, TLSFiles{})
		if err != nil {
			t.Errorf("%s: %v", addr, err)
			continue
		}
		l.Close()
	}
}
