package nixbuild

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

// killGrace is how long Nix gets to stop its builders after SIGTERM before
// its whole process group is killed.
const killGrace = 5 * time.Second

// run executes one Nix command and returns its stdout. stderr is logged line
// by line and its tail kept for errors. Cancelling ctx ends the command's
// whole process group: Nix interrupts its builders on SIGTERM, and SIGKILL
// follows if it does not exit in time.
func (b *Builder) run(ctx context.Context, stage, name string, args ...string) ([]byte, error) {
	return b.runEnv(ctx, nil, stage, name, args...)
}

// runEnv is run with env as the command's environment (nil: this
// process's).
func (b *Builder) runEnv(ctx context.Context, env []string, stage, name string, args ...string) ([]byte, error) {
	b.storeInit.open(ctx, b)
	cmd := exec.CommandContext(ctx, b.bin(name), args...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	exited := make(chan struct{})
	var cancelled atomic.Bool
	cmd.Cancel = func() error {
		cancelled.Store(true)
		pgid := cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		go func() {
			select {
			case <-exited:
			case <-time.After(killGrace):
				_ = syscall.Kill(-pgid, syscall.SIGKILL)
			}
		}()
		return nil
	}
	cmd.WaitDelay = killGrace + time.Second
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}

	logger := log.G(ctx).WithField("nix", name)
	logger.WithField("args", args).Debug("running nix")
	if err := cmd.Start(); err != nil {
		return nil, &BuildError{Stage: stage, Err: fmt.Errorf("start %s: %w", name, err)}
	}
	tail := newTail(b.logLines)
	var did activity
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		scanner := bufio.NewScanner(stderr)
		scanner.Buffer(make([]byte, 64*1024), 1024*1024)
		for scanner.Scan() {
			line := scanner.Text()
			tail.add(line)
			did.line(line)
			logger.Debug(line)
			progress.Nix(ctx, line)
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	wg.Wait()
	err = cmd.Wait()
	close(exited)
	did.report(ctx, b)
	if cancelled.Load() {
		// Sweep what is left of the group while its id is still held by
		// the stragglers; once the group is empty the id may be reused,
		// so nothing is sent to it later.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			err = ctxErr
		}
		return nil, &BuildError{Stage: stage, Log: tail.String(), Shown: progress.Watched(ctx), Err: fmt.Errorf("%s: %w", name, err)}
	}
	return stdout.Bytes(), nil
}

// limited runs a Nix command once fewer than maxHoldProcs of them run.
func (b *Builder) limited(ctx context.Context, stage, name string, args ...string) ([]byte, error) {
	select {
	case b.procs <- struct{}{}:
		defer func() { <-b.procs }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return b.run(ctx, stage, name, args...)
}

// tail keeps the last n lines written to it.
type tail struct {
	lines []string
	next  int
	full  bool
}

func newTail(n int) *tail { return &tail{lines: make([]string, n)} }

func (t *tail) add(line string) {
	if len(t.lines) == 0 {
		return
	}
	t.lines[t.next] = line
	t.next = (t.next + 1) % len(t.lines)
	t.full = t.full || t.next == 0
}

func (t *tail) String() string {
	var out []string
	if t.full {
		out = append(out, t.lines[t.next:]...)
	}
	out = append(out, t.lines[:t.next]...)
	return strings.Join(out, "\n")
}
