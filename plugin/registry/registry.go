// Package registry is the read-only OCI distribution endpoint through
// which containerd (CRI, ctr, nerdctl) and registry clients pull the images
// this node builds.
package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/errkind"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/listen"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/version"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin"
	"github.com/nixery-snapshotter/nixery-snapshotter/plugin/layer"
)

// maxLogInError bounds the Nix log carried in a registry error message.
const maxLogInError = 4096

// Registry is a read-only OCI distribution endpoint for node-local pulls:
// containerd (CRI, ctr, nerdctl) reaches it through a certs.d/hosts.toml
// mirror for the image host, so unmodified clients pull nix.local images.
// A manifest request by tag builds the image; blobs are served by digest,
// layers streamed from the store on demand.
type Registry struct {
	builder *plugin.ImageBuilder
	// describer describes the layers of an image a request builds.
	describer    func(context.Context) layer.Describer
	earlyHeaders time.Duration

	mu    sync.Mutex
	blobs map[digest.Digest]servedBlob
}

// servedBlob is a blob the registry can serve: in memory, or a layer of
// an image whose store paths hold keeps alive while it is read.
type servedBlob struct {
	mediaType string
	data      []byte
	layer     *layer.Layer
	hold      *imageHold
}

// imageHold keeps the store paths of an image from Nix's garbage collector
// while any of its layers is read: one hold shared by all its readers,
// however many (the build that described them may be long done). The hold
// is taken for the first reader without its deadline, so that a reader
// who leaves does not fail the others; each reader waits with its own.
type imageHold struct {
	nix   plugin.Nix
	paths []string

	mu    sync.Mutex
	users int
	taken chan struct{} // closed when the current hold is taken or failed
	roots *nixbuild.Roots
	err   error
}

func (h *imageHold) acquire(ctx context.Context) error {
	h.mu.Lock()
	if h.users++; h.users == 1 {
		taken := make(chan struct{})
		h.taken, h.roots, h.err = taken, nil, nil
		go func() {
			roots, err := h.nix.Hold(context.WithoutCancel(ctx), h.paths)
			h.mu.Lock()
			defer h.mu.Unlock()
			if h.taken != taken || h.users == 0 {
				// Everyone left meanwhile.
				roots.Release()
				return
			}
			h.roots, h.err = roots, err
			close(taken)
		}()
	}
	taken := h.taken
	h.mu.Unlock()
	select {
	case <-taken:
	case <-ctx.Done():
		h.release()
		return ctx.Err()
	}
	h.mu.Lock()
	err := h.err
	h.mu.Unlock()
	if err != nil {
		h.release()
	}
	return err
}

func (h *imageHold) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.users--; h.users == 0 {
		h.roots.Release()
		h.roots, h.taken = nil, nil
	}
}

// The endpoint's metrics, in Prometheus' default registry.
var (
	inflightRequests = promauto.NewGauge(prometheus.GaugeOpts{
		Namespace: "nixery", Name: "inflight_requests",
		Help: "Distribution endpoint requests being answered.",
	})
	requestsTotal = promauto.NewCounterVec(prometheus.CounterOpts{
		Namespace: "nixery", Name: "requests_total",
		Help: "Distribution endpoint requests by route and status code.",
	}, []string{"route", "code"})
)

// Opt configures a Registry.
type Opt func(*Registry)

// WithEarlyHeaders sets how long a manifest request waits for its build
// before it answers with headers and sends the manifest when it is built.
func WithEarlyHeaders(d time.Duration) Opt {
	return func(r *Registry) {
		if d > 0 {
			r.earlyHeaders = d
		}
	}
}

// WithDescriber describes the layers of the images requests build with
// the Describer describer makes for each request (which must describe tar
// layers), instead of by digest alone: to unpack them on the way, for
// instance (plugin.Provisioner.Stager).
func WithDescriber(describer func(context.Context) layer.Describer) Opt {
	return func(r *Registry) { r.describer = describer }
}

// New serves images built by builder.
func New(builder *plugin.ImageBuilder, opts ...Opt) *Registry {
	digests := builder.DigestDescriber()
	r := &Registry{builder: builder, blobs: map[digest.Digest]servedBlob{}, earlyHeaders: plugin.DefaultEarlyHeaders,
		describer: func(context.Context) layer.Describer { return digests }}
	for _, opt := range opts {
		opt(r)
	}
	return r
}

// Serve serves r on cfg's TCP address until ctx ends, for containerd and
// other registry clients: loopback, or TLS with client certificates.
func Serve(ctx context.Context, r *Registry, cfg plugin.RegistryConfig) error {
	const what = "the distribution endpoint"
	l, err := listen.TCP(what, cfg.Address, cfg.TLS())
	if err != nil {
		return err
	}
	return listen.Serve(ctx, what, r, l)
}

// ServeHTTP implements http.Handler.
func (r *Registry) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	w := &statusWriter{ResponseWriter: rw, status: http.StatusOK}
	start := time.Now()
	inflightRequests.Inc()
	route := "other"
	defer func() {
		inflightRequests.Dec()
		requestsTotal.WithLabelValues(route, strconv.Itoa(w.status)).Inc()
		log.G(req.Context()).WithFields(log.Fields{
			"method": req.Method, "path": req.URL.Path, "status": w.status,
			"duration": time.Since(start).Round(time.Millisecond),
		}).Debug("registry request")
	}()
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	w.Header().Set("Nixery-Version", version.Version())
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "this registry is read-only: "+req.Method+" is not supported")
		return
	}
	// Registry names never need percent-encoding: an encoded slash or dot
	// is someone trying to get past the routing.
	if req.URL.RawPath != "" || strings.Contains(req.URL.Path, "%") {
		writeError(w, http.StatusBadRequest, "NAME_INVALID", "percent-encoded characters are not allowed in registry paths")
		return
	}
	// Route on the path: containerd adds ?ns=HOST to mirror requests.
	path := req.URL.Path
	if path == "/v2/" || path == "/v2" {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, "{}")
		return
	}
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		writeError(w, http.StatusNotFound, "NAME_UNKNOWN", "not a registry API path: "+path)
		return
	}
	if name, ref, ok := cutLast(rest, "/manifests/"); ok {
		route = "manifests"
		r.manifest(w, req, name, ref)
		return
	}
	if _, dgst, ok := cutLast(rest, "/blobs/"); ok {
		route = "blobs"
		r.blob(w, req, dgst)
		return
	}
	if name, ok := strings.CutSuffix(rest, "/tags/list"); ok {
		route = "tags"
		r.tags(w, req, name)
		return
	}
	writeError(w, http.StatusNotFound, "NAME_UNKNOWN", "not a registry API path: "+path)
}

// tags lists the tags of an image: the revisions served that can be
// listed (skopeo and crane ask before anything else). Nothing is built.
func (r *Registry) tags(w http.ResponseWriter, req *http.Request, name string) {
	if _, err := r.builder.ParseName(r.builder.Host() + "/" + name); err != nil {
		writeBuildError(req.Context(), w, err)
		return
	}
	tags := r.builder.Nix().Tags()
	q := req.URL.Query()
	if last := q.Get("last"); last != "" {
		i, _ := slices.BinarySearch(tags, last)
		for i < len(tags) && tags[i] <= last {
			i++
		}
		tags = tags[i:]
	}
	if n, err := strconv.Atoi(q.Get("n")); err == nil && n >= 0 && n < len(tags) {
		tags = tags[:n]
	}
	w.Header().Set("Content-Type", "application/json")
	if req.Method == http.MethodHead {
		return
	}
	_ = json.NewEncoder(w).Encode(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{name, append([]string{}, tags...)})
}

func cutLast(s, sep string) (string, string, bool) {
	i := strings.LastIndex(s, sep)
	if i <= 0 || i+len(sep) == len(s) {
		return "", "", false
	}
	return s[:i], s[i+len(sep):], true
}

func (r *Registry) manifest(w http.ResponseWriter, req *http.Request, name, ref string) {
	ctx := req.Context()
	if d, err := digest.Parse(ref); err == nil {
		blob, ok := r.lookup(d)
		if !ok || blob.data == nil {
			writeError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", "manifest "+ref+" is unknown: request it by tag first")
			return
		}
		writeBlob(w, req, blob.mediaType, d, blob.data)
		return
	} else if strings.Contains(ref, ":") {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("invalid digest %q: %v", ref, err))
		return
	}
	type result struct {
		img *plugin.Image
		err error
	}
	built := make(chan result, 1)
	go func() {
		describe := r.describer(ctx)
		img, err := r.builder.Build(ctx, r.builder.Host()+"/"+name+":"+ref, describe)
		built <- result{img, err}
	}()
	var res result
	select {
	case res = <-built:
	case <-ctx.Done():
		return
	case <-time.After(r.earlyHeaders):
		// A long build: commit to success now, so that the client keeps
		// waiting. A HEAD without a digest makes containerd GET the
		// manifest, which joins this build; a GET gets its body (whose
		// digest the client computes) when the build is done. A failure
		// from here on can only abort the response.
		w.Header().Set("Content-Type", r.builder.TargetType(r.builder.Host()+"/"+name+":"+ref))
		w.WriteHeader(http.StatusOK)
		if req.Method == http.MethodHead {
			return
		}
		http.NewResponseController(w).Flush()
		select {
		case res = <-built:
		case <-ctx.Done():
			return
		}
		if res.err != nil {
			log.G(ctx).WithError(res.err).Warn("image build failed after the response had begun")
			panic(http.ErrAbortHandler)
		}
		r.remember(res.img)
		_, _ = w.Write(res.img.Blobs[res.img.Target.Digest])
		return
	}
	if res.err != nil {
		writeBuildError(ctx, w, res.err)
		return
	}
	img := res.img
	r.remember(img)
	writeBlob(w, req, img.Target.MediaType, img.Target.Digest, img.Blobs[img.Target.Digest])
}

// remember makes img's blobs servable by digest: its target's, and those
// of each image under it.
func (r *Registry) remember(img *plugin.Image) {
	r.mu.Lock()
	defer r.mu.Unlock()
	mediaTypes := map[digest.Digest]string{img.Target.Digest: img.Target.MediaType}
	for _, i := range img.Images() {
		mediaTypes[i.Manifest.Digest] = i.Manifest.MediaType
		mediaTypes[i.Config.Digest] = i.Config.MediaType
	}
	for d, b := range img.Blobs {
		r.blobs[d] = servedBlob{mediaType: mediaTypes[d], data: b}
	}
	for _, i := range img.Images() {
		hold := &imageHold{nix: r.builder.Nix(), paths: i.Paths()}
		for _, l := range i.Layers {
			if l.Blob == nil {
				r.blobs[l.Desc.Digest] = servedBlob{mediaType: l.Desc.MediaType, layer: l, hold: hold}
			}
		}
	}
}

func (r *Registry) lookup(d digest.Digest) (servedBlob, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	b, ok := r.blobs[d]
	return b, ok
}

func (r *Registry) blob(w http.ResponseWriter, req *http.Request, ref string) {
	d, err := digest.Parse(ref)
	if err != nil {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("invalid digest %q: %v", ref, err))
		return
	}
	blob, ok := r.lookup(d)
	if !ok {
		writeError(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob "+ref+" is unknown: request its manifest by tag first")
		return
	}
	if blob.data != nil {
		writeBlob(w, req, "application/octet-stream", d, blob.data)
		return
	}
	r.layer(w, req, d, blob)
}

// layer streams a tar layer, re-made from the store; a range is served by
// skipping to it without reading the files before it.
func (r *Registry) layer(w http.ResponseWriter, req *http.Request, d digest.Digest, blob servedBlob) {
	l := blob.layer
	size := l.Desc.Size
	start, end, partial, err := parseRange(req.Header.Get("Range"), size)
	if err != nil {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		writeError(w, http.StatusRequestedRangeNotSatisfiable, "UNSUPPORTED", err.Error())
		return
	}
	if err := blob.hold.acquire(req.Context()); err != nil {
		writeError(w, http.StatusNotFound, "BLOB_UNKNOWN", fmt.Sprintf("blob %s: %v: request its manifest again", d, err))
		return
	}
	defer blob.hold.release()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Length", strconv.FormatInt(end-start, 10))
	status := http.StatusOK
	if partial {
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end-1, size))
		status = http.StatusPartialContent
	}
	w.WriteHeader(status)
	if req.Method == http.MethodHead {
		return
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(l.WriteTarFrom(pw, start)) }()
	defer pr.Close()
	n, err := io.CopyN(listen.NewStallWriter(w, listen.WriteStall), pr, end-start)
	layer.Streamed(n)
	if err != nil {
		log.G(req.Context()).WithError(err).WithField("digest", d).Warn("streaming layer")
	}
}

// parseRange reads a single "bytes=a-b" range; no header means all.
func parseRange(header string, size int64) (start, end int64, partial bool, err error) {
	if header == "" {
		return 0, size, false, nil
	}
	spec, ok := strings.CutPrefix(header, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false, fmt.Errorf("unsupported range %q", header)
	}
	first, last, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, false, fmt.Errorf("invalid range %q", header)
	}
	switch {
	case first == "": // suffix: the last N bytes
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n <= 0 {
			return 0, 0, false, fmt.Errorf("invalid range %q", header)
		}
		return max(0, size-n), size, true, nil
	default:
		start, err = strconv.ParseInt(first, 10, 64)
		if err != nil || start < 0 || start >= size {
			return 0, 0, false, fmt.Errorf("range %q outside %d bytes", header, size)
		}
		end = size
		if last != "" {
			l, err := strconv.ParseInt(last, 10, 64)
			if err != nil || l < start {
				return 0, 0, false, fmt.Errorf("invalid range %q", header)
			}
			end = min(l+1, size)
		}
		return start, end, true, nil
	}
}

func writeBlob(w http.ResponseWriter, req *http.Request, mediaType string, d digest.Digest, data []byte) {
	h := w.Header()
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Content-Type", mediaType)
	h.Set("Content-Length", strconv.Itoa(len(data)))
	if req.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return
	}
	_, _ = w.Write(data)
}

// writeBuildError answers a failed build with its registry error.
func writeBuildError(ctx context.Context, w http.ResponseWriter, err error) {
	kind := errkind.Of(err)
	msg := err.Error()
	if kind.Internal {
		log.G(ctx).WithError(err).Warn("image build failed")
		if len(msg) > maxLogInError {
			msg = "..." + msg[len(msg)-maxLogInError:]
		}
	}
	if kind.Retry {
		w.Header().Set("Retry-After", "5")
	}
	writeError(w, kind.Status, kind.Code, msg)
}

// writeError writes the distribution API's error document.
func writeError(w http.ResponseWriter, status int, code, message string) {
	type regErr struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Errors []regErr `json:"errors"`
	}{[]regErr{{code, message}}})
}

// statusWriter remembers the status for the request log.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(status int) {
	w.status = status
	w.ResponseWriter.WriteHeader(status)
}

// Unwrap lets http.ResponseController reach the connection (Flush).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
