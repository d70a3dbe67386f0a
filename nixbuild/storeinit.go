package nixbuild

import (
	"context"
	"errors"
	"os/exec"
	"sync"
	"sync/atomic"

	"github.com/containerd/log"
)

// storeInit opens the Nix store once, alone, before this process runs
// Nix processes beside each other: a store that was never opened (a
// fresh node, a new /nix) is set up by whichever process opens it first,
// and of two that do at once, Nix fails one ("creating symlink
// '/nix/var/nix/gcroots/profiles' -> '/nix/var/nix/profiles': File
// exists", Nix 2.26), which would fail a first request.
type storeInit struct {
	mu   sync.Mutex
	done atomic.Bool
}

// open runs `nix-store --check-validity` with no path (it opens the store
// and checks nothing) unless that ran already; whatever it says, the
// command that follows reports the store's trouble. Where it could not
// run at all (Nix not installed yet, as when the daemon starts first) or
// was stopped, the next command opens the store again.
func (s *storeInit) open(ctx context.Context, b *Builder) {
	if s.done.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done.Load() {
		return
	}
	out, err := exec.CommandContext(ctx, b.bin("nix-store"), b.args("--check-validity")...).CombinedOutput()
	if err != nil {
		log.G(ctx).WithError(err).WithField("output", string(out)).Debug("opening the Nix store")
	}
	var exited *exec.ExitError
	s.done.Store(ctx.Err() == nil && (err == nil || errors.As(err, &exited)))
}
