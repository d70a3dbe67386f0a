package layer

import (
	"context"
	"errors"
	"io"
	"sync"

	"github.com/containerd/containerd/v2/core/content"
)

// ReaderAt reads l's tar as a content store blob, re-made from the store as
// it is read: reads in order (as content.NewReader and every copy do) are
// one stream, and a read elsewhere starts the stream there without reading
// the files before it. Nothing of the layer is held in memory. Reading
// fails once ctx ends.
func ReaderAt(ctx context.Context, l *Layer) content.ReaderAt { return &readerAt{ctx: ctx, l: l} }

type readerAt struct {
	ctx context.Context
	l   *Layer

	mu   sync.Mutex // ReadAt may be called at once; the stream is one
	pr   *io.PipeReader
	off  int64 // where pr is
	done chan struct{}
}

func (r *readerAt) Size() int64 { return r.l.Desc.Size }

func (r *readerAt) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	size := r.l.Desc.Size
	switch {
	case off < 0:
		return 0, errors.New("layer: negative offset")
	case r.ctx.Err() != nil:
		return 0, r.ctx.Err()
	case off >= size:
		return 0, io.EOF
	}
	if r.pr == nil || off != r.off {
		r.stop()
		pr, pw := io.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			pw.CloseWithError(r.l.WriteTarFrom(ctxWriter{r.ctx, pw}, off))
		}()
		r.pr, r.off, r.done = pr, off, done
	}
	want := min(int64(len(p)), size-off)
	n, err := io.ReadFull(r.pr, p[:want])
	r.off += int64(n)
	switch {
	case err == io.ErrUnexpectedEOF || err == io.EOF:
		return n, io.ErrUnexpectedEOF // the tar is shorter than described: the store changed
	case err != nil:
		return n, err
	case want < int64(len(p)):
		return n, io.EOF
	}
	return n, nil
}

// stop ends the stream under way and waits until it reads the store no
// more.
func (r *readerAt) stop() {
	if r.pr != nil {
		r.pr.Close()
		<-r.done
		r.pr = nil
	}
}

// Close ends the stream under way.
func (r *readerAt) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stop()
	return nil
}
