package pipelined

import (
	"bytes"
	"errors"
	"testing"
)

// What is written arrives in order, whatever the sizes of the writes.
func TestWriterOrder(t *testing.T) {
	var want, got bytes.Buffer
	w := New(&got, 7)
	for i := range 100 {
		b := bytes.Repeat([]byte{byte(i)}, i%13)
		want.Write(b)
		if _, err := w.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Errorf("got %d bytes, want %d, or out of order", got.Len(), want.Len())
	}
}

type failing struct{ after int }

var errFull = errors.New("disk full")

func (f *failing) Write(b []byte) (int, error) {
	if f.after -= len(b); f.after < 0 {
		return 0, errFull
	}
	return len(b), nil
}

// The consumer's error reaches the producer: later writes and Close fail.
func TestWriterError(t *testing.T) {
	w := New(&failing{after: 10}, 4)
	var err error
	for i := 0; i < 1000 && err == nil; i++ {
		_, err = w.Write([]byte("abcd"))
	}
	if cerr := w.Close(); !errors.Is(cerr, errFull) {
		t.Errorf("Close: %v", cerr)
	}
	if err != nil && !errors.Is(err, errFull) {
		t.Errorf("Write: %v", err)
	}
}
