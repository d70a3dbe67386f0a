package layer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
)

// Reads in order and reads anywhere give the tar's bytes; a layer whose
// store changed under it (the tar is shorter) is an error, not a short
// blob.
func TestReaderAt(t *testing.T) {
	l := testLayer(t)
	var whole bytes.Buffer
	if err := l.WriteTar(&whole); err != nil {
		t.Fatal(err)
	}
	l.Desc.Size = int64(whole.Len())
	r := ReaderAt(context.Background(), l)
	defer r.Close()
	got, err := io.ReadAll(content.NewReader(r))
	if err != nil || !bytes.Equal(got, whole.Bytes()) {
		t.Fatalf("read in order: %d bytes, %v; want %d", len(got), err, whole.Len())
	}
	for _, off := range []int64{512, 0, int64(whole.Len()) - 10, 1000, 1001} {
		p := make([]byte, 100)
		n, err := r.ReadAt(p, off)
		want := whole.Bytes()[off:min(off+100, int64(whole.Len()))]
		if !bytes.Equal(p[:n], want) || (n < len(p)) != (err == io.EOF) {
			t.Errorf("ReadAt at %d: %d bytes, %v; want %d", off, n, err, len(want))
		}
	}
	if n, err := r.ReadAt(make([]byte, 1), int64(whole.Len())); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end: %d, %v", n, err)
	}

	if _, err := r.ReadAt(make([]byte, 1), -1); err == nil {
		t.Error("a negative offset read")
	}
	// A reader whose context ended reads no more.
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := io.ReadAll(content.NewReader(ReaderAt(gone, l))); !errors.Is(err, context.Canceled) {
		t.Errorf("read after the context ended: %v", err)
	}

	if err := os.WriteFile(filepath.Join(l.Paths[0], "bin", "pkg"), nil, 0o555); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(content.NewReader(ReaderAt(context.Background(), l))); err == nil {
		t.Error("a layer shorter than described read without an error")
	}
}
