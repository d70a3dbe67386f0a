package plugin

import (
	"context"
	"fmt"
	"net"
	"net/http"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/errkind"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/listen"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/version"
)

// DefaultMetricsAddress is where metrics and health are served: loopback.
const DefaultMetricsAddress = "127.0.0.1:9484"

// The daemon's metrics, in Prometheus' default registry.
var (
	buildsTotal = promauto.NewCounterVec(prometheus.CounterOpts{
		Namespace: "nixery", Name: "builds_total",
		Help: "Image requests by result: ok, cached, not_found, refused, invalid, busy, failed, timeout.",
	}, []string{"result"})
	buildSeconds = promauto.NewHistogram(prometheus.HistogramOpts{
		Namespace: "nixery", Name: "build_duration_seconds",
		Help:    "Time to build an image (Nix, grouping, describing layers).",
		Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
	})
	registerRetries = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "register_retries_total",
		Help: "Registrations tried again because containerd could not reach the snapshotter (redialling one that restarted).",
	})
	stagingFailures = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "staging_failures_total",
		Help: "Images the endpoint could not unpack into a [registry] unpack_into target before answering: pulls there fetch their layers.",
	})
	buildInfo = promauto.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "nixery", Name: "build_info",
		Help: "1, labelled with this daemon's version.",
	}, []string{"version"})
)

// buildResult names the outcome of a build for the builds_total metric.
func buildResult(err error) string {
	if err == nil {
		return "ok"
	}
	return errkind.Of(err).Result
}

// ServeMetrics serves /metrics (Prometheus) and /healthz on address until
// ctx ends. healthy reports whether the daemon can serve.
func ServeMetrics(ctx context.Context, address string, healthy func() error) error {
	buildInfo.WithLabelValues(version.Version()).Set(1)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.Handler())
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	l, err := net.Listen("tcp", address)
	if err != nil {
		return fmt.Errorf("metrics and health: %w", err)
	}
	if !listen.Loopback(address) {
		log.G(ctx).WithField("address", address).Warn("metrics and health are served beyond this host, without authentication")
	}
	return listen.Serve(ctx, "metrics and health", mux, l)
}
