package nixbuild

import (
	"context"
	"strings"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	derivationsBuilt = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "nix_derivations_built_total",
		Help: "Derivations Nix built on this node (its builder ran) rather than substituted.",
	})
	pathsSubstituted = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "nix_paths_substituted_total",
		Help: "Store paths Nix fetched from a substituter (binary cache) instead of building.",
	})
)

// activity counts what one Nix command's log says it did: derivations
// built and paths substituted, in the lines every Nix since 2.0 writes
// ("building '/nix/store/…drv'...", "copying path '…' from 'URI'...").
type activity struct{ built, substituted int }

func (a *activity) line(line string) {
	switch {
	case strings.HasPrefix(line, "building '/") && strings.Contains(line, ".drv'"):
		a.built++
		derivationsBuilt.Inc()
	case strings.HasPrefix(line, "copying path '/") && strings.Contains(line, "' from '"):
		a.substituted++
		pathsSubstituted.Inc()
	}
}

// report logs what a command built: at warning level where the options
// name binary caches (building was the fallback, and costs the node
// time), else as information.
func (a *activity) report(ctx context.Context, b *Builder) {
	if a.built == 0 && a.substituted == 0 {
		return
	}
	l := log.G(ctx).WithField("built", a.built).WithField("substituted", a.substituted)
	if a.built > 0 && b.caches.configured() {
		l.Warn("Nix built derivations here that no substituter had")
		return
	}
	l.Info("Nix realised store paths")
}
