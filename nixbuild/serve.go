package nixbuild

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild/storepath"
)

// Nix's serve protocol (`nix-store --serve`, what ssh:// stores speak):
// 64-bit little-endian integers, strings as a length and bytes padded to 8.
// Every Nix since 2.0 serves version 2.x of it; a client and a server use
// the lower of their versions.
const (
	serveMagic1        = 0x390c9deb
	serveMagic2        = 0x5452eecb
	serveVersion       = 2<<8 | 7 // Nix 2.8's; later servers speak it too
	cmdQueryValidPaths = 1
	// maxServeString bounds a string the server sends (a store path).
	maxServeString = 4096
)

// serveIdle is how long an unused serve process is kept, so that the holds
// of an image's layers, which come one after another, share one process.
// Its temporary roots go when it exits; every hold has made permanent ones
// by then.
const serveIdle = 5 * time.Second

// serveTimeout bounds one request to the serve process (and its start): a
// process that answers nothing for this long is stuck, and is ended.
const serveTimeout = time.Minute

// storeConn is one `nix-store --serve --write` process. Asked which paths
// are valid "with lock", it first makes them temporary GC roots of its own
// (registered with a collection already running, through Nix's GC socket):
// a path it says is valid stays so for as long as the process lives.
type storeConn struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	w      *bufio.Writer
	r      *bufio.Reader
	exited chan struct{}
	turn   chan struct{} // one request at a time
}

func (b *Builder) startServe(ctx context.Context) (*storeConn, error) {
	b.storeInit.open(ctx, b)
	// Not bound to the request that starts it: the process serves others.
	cmd := exec.Command(b.bin("nix-store"), b.args("--serve", "--write")...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start nix-store --serve: %w", err)
	}
	c := &storeConn{cmd: cmd, stdin: stdin, w: bufio.NewWriter(stdin), r: bufio.NewReader(stdout),
		exited: make(chan struct{}), turn: make(chan struct{}, 1)}
	logger := log.G(ctx).WithField("nix", "nix-store --serve")
	go func() {
		scanner := bufio.NewScanner(stderr)
		for scanner.Scan() {
			logger.Debug(scanner.Text())
		}
		_, _ = io.Copy(io.Discard, stderr)
		_ = cmd.Wait()
		close(c.exited)
	}()
	if err := c.do(ctx, c.handshake); err != nil {
		c.kill()
		return nil, fmt.Errorf("nix-store --serve: %w", err)
	}
	return c, nil
}

// do runs one request on the connection once it is this caller's turn. A
// caller that gives up (ctx) before its turn leaves the connection as it
// was; one that gives up during its request leaves the request to finish
// without it. A request that is not answered within serveTimeout ends the
// process, which is stuck.
func (c *storeConn) do(ctx context.Context, request func() error) error {
	select {
	case c.turn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.exited:
		return errServeExited
	}
	done := make(chan error, 1)
	go func() {
		defer func() { <-c.turn }()
		done <- request()
	}()
	timer := time.NewTimer(serveTimeout)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		c.kill()
		return fmt.Errorf("no answer for %s", serveTimeout)
	}
}

// errServeExited says the serve process is gone.
var errServeExited = errors.New("nix-store --serve exited")

func (c *storeConn) handshake() error {
	c.writeInt(serveMagic1)
	if err := c.w.Flush(); err != nil {
		return err
	}
	magic, err := c.readInt()
	if err != nil {
		return err
	}
	if magic != serveMagic2 {
		return fmt.Errorf("protocol mismatch: magic %#x", magic)
	}
	version, err := c.readInt()
	if err != nil {
		return err
	}
	if version>>8 != serveVersion>>8 {
		return fmt.Errorf("serve protocol %d.%d, not 2.x", version>>8, version&0xff)
	}
	c.writeInt(serveVersion)
	return c.w.Flush()
}

// validPaths answers which of paths are valid, each made a temporary root
// first if lock is set.
func (c *storeConn) validPaths(paths []string, lock bool) ([]string, error) {
	c.writeInt(cmdQueryValidPaths)
	c.writeInt(map[bool]uint64{false: 0, true: 1}[lock])
	c.writeInt(0) // substitute: no
	c.writeInt(uint64(len(paths)))
	for _, p := range paths {
		c.writeString(p)
	}
	if err := c.w.Flush(); err != nil {
		return nil, err
	}
	n, err := c.readInt()
	if err != nil {
		return nil, err
	}
	if n > uint64(len(paths)) {
		return nil, fmt.Errorf("%d valid paths of %d asked", n, len(paths))
	}
	valid := make([]string, 0, n)
	for range n {
		p, err := c.readString()
		if err != nil {
			return nil, err
		}
		if !slices.Contains(paths, p) {
			return nil, fmt.Errorf("answered %q, which was not asked", p)
		}
		valid = append(valid, p)
	}
	return valid, nil
}

func (c *storeConn) writeInt(n uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], n)
	_, _ = c.w.Write(b[:])
}

func (c *storeConn) writeString(s string) {
	c.writeInt(uint64(len(s)))
	_, _ = c.w.WriteString(s)
	_, _ = c.w.Write(make([]byte, (8-len(s)%8)%8))
}

func (c *storeConn) readInt() (uint64, error) {
	var b [8]byte
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

func (c *storeConn) readString() (string, error) {
	n, err := c.readInt()
	if err != nil {
		return "", err
	}
	if n > maxServeString {
		return "", fmt.Errorf("string of %d bytes", n)
	}
	b := make([]byte, n+(8-n%8)%8)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return "", err
	}
	return string(b[:n]), nil
}

func (c *storeConn) alive() bool {
	select {
	case <-c.exited:
		return false
	default:
		return true
	}
}

// close ends the process: on end of input it exits, dropping its roots.
func (c *storeConn) close() {
	_ = c.stdin.Close()
	select {
	case <-c.exited:
	case <-time.After(killGrace):
		c.kill()
	}
}

// kill ends the process at once.
func (c *storeConn) kill() {
	_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	<-c.exited
}

// held reports whether the process still serves: if so, the temporary
// roots it made before are still in place.
func (c *storeConn) held() bool {
	return c.do(context.Background(), func() error {
		_, err := c.validPaths(nil, false)
		return err
	}) == nil
}

// store shares one storeConn between the holds of a Builder: started when
// needed, ended once unused for serveIdle.
type store struct {
	b     *Builder
	mu    sync.Mutex
	conn  *storeConn
	users int
	idle  *time.Timer
}

// tempRoots makes paths temporary roots and returns those that are valid.
// They stay roots until release is called, as long as the connection
// lives: after making roots of its own, the caller checks held() to know
// they were kept all along.
func (s *store) tempRoots(ctx context.Context, paths []string) (valid []string, held func() bool, release func(), err error) {
	if err := storepath.CheckAll(paths); err != nil {
		return nil, nil, nil, err
	}
	for attempt := 0; ; attempt++ {
		conn, err := s.acquire(ctx)
		if err != nil {
			return nil, nil, nil, err
		}
		release := sync.OnceFunc(func() { s.release() })
		// The request may finish after its caller gave up: it answers
		// through a channel, not the caller's variables.
		answer := make(chan []string, 1)
		err = conn.do(ctx, func() error {
			v, err := conn.validPaths(paths, true)
			answer <- v
			return err
		})
		switch {
		case err == nil:
			return <-answer, conn.held, release, nil
		case ctx.Err() != nil:
			release()
			return nil, nil, nil, ctx.Err()
		}
		s.discard(conn)
		release()
		if attempt > 0 {
			return nil, nil, nil, &BuildError{Stage: "hold", Err: fmt.Errorf("nix-store --serve: %w", err)}
		}
		log.G(ctx).WithError(err).Warn("nix-store --serve failed: starting it again")
	}
}

// warm starts the serve process, unless it runs, for roots about to be
// made: its start then costs the caller nothing.
func (s *store) warm(ctx context.Context) {
	if _, err := s.acquire(ctx); err == nil {
		s.release()
	}
}

func (s *store) acquire(ctx context.Context) (*storeConn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.idle != nil {
		s.idle.Stop()
		s.idle = nil
	}
	if s.conn == nil || !s.conn.alive() {
		conn, err := s.b.startServe(ctx)
		if err != nil {
			return nil, &BuildError{Stage: "hold", Err: err}
		}
		s.conn = conn
	}
	s.users++
	return s.conn, nil
}

func (s *store) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.users--; s.users == 0 && s.conn != nil {
		conn := s.conn
		s.idle = time.AfterFunc(serveIdle, func() {
			s.mu.Lock()
			if s.users > 0 || s.conn != conn {
				s.mu.Unlock()
				return
			}
			s.conn, s.idle = nil, nil
			s.mu.Unlock()
			conn.close()
		})
	}
}

// discard ends a connection that failed. Those who rely on its roots learn
// of it from held().
func (s *store) discard(conn *storeConn) {
	s.mu.Lock()
	if s.conn == conn {
		s.conn = nil
	}
	s.mu.Unlock()
	go conn.close()
}

// stop ends the connection, whoever uses it (the Builder is closing).
func (s *store) stop() {
	s.mu.Lock()
	conn := s.conn
	s.conn = nil
	if s.idle != nil {
		s.idle.Stop()
		s.idle = nil
	}
	s.mu.Unlock()
	if conn != nil {
		conn.close()
	}
}

var errNotHeld = errors.New("nix-store --serve exited before the roots were made")
