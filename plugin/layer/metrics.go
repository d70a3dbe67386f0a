package layer

import (
	"context"

	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// The layers' metrics, in Prometheus' default registry.
var (
	layersPacked = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "layers_packed_total",
		Help: "Layers read from the store and hashed to be described.",
	})
	layersLinked = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "layers_linked_total",
		Help: "Layers unpacked into snapshots as links to the store, no file data written.",
	})
	bytesStreamed = promauto.NewCounter(prometheus.CounterOpts{
		Namespace: "nixery", Name: "bytes_streamed_total",
		Help: "Layer bytes streamed (packed, written, or served).",
	})
)

// Streamed counts layer bytes streamed (bytes_streamed_total), wherever.
func Streamed(n int64) { bytesStreamed.Add(float64(n)) }

// packed counts a layer read from the store and hashed, as desc.
func packed(ctx context.Context, desc ocispec.Descriptor) {
	layersPacked.Inc()
	bytesStreamed.Add(float64(desc.Size))
	log.G(ctx).WithFields(log.Fields{"digest": desc.Digest, "size": desc.Size}).Debug("packed layer")
}
