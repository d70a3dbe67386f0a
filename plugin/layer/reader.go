package layer

import (
	"io"

	"github.com/containerd/containerd/v2/core/content"
)

// ReaderAt reads l's tar as a content store blob, re-made from the store as
// it is read: reads in order (as content.NewReader and every copy do) are
// one stream, and a read elsewhere starts the stream there without reading
// the files before it. Nothing of the layer is held in memory.
func ReaderAt(l *Layer) content.ReaderAt { return &readerAt{l: l} }

type readerAt struct {
	l   *Layer
	pr  *io.PipeReader
	off int64 // where pr is
}

func (r *readerAt) Size() int64 { return r.l.Desc.Size }

func (r *readerAt) ReadAt(p []byte, off int64) (int, error) {
	size := r.l.Desc.Size
	if off >= size {
		return 0, io.EOF
	}
	if r.pr == nil || off != r.off {
		r.Close()
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(r.l.WriteTarFrom(pw, off)) }()
		r.pr, r.off = pr, off
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

// Close ends the stream under way.
func (r *readerAt) Close() error {
	if r.pr != nil {
		r.pr.Close()
		r.pr = nil
	}
	return nil
}
