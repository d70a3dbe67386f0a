// Package pipelined overlaps producing a stream with consuming it: a layer's
// tar is packed (files read, hashed) while the chunk before is stored.
package pipelined

import (
	"io"
	"sync"
)

// Writer buffers writes into chunks that a goroutine hands to w, at
// most three chunks in memory: the writer producing bytes and w consuming
// them work at the same time.
type Writer struct {
	chunk int
	cur   []byte
	full  chan []byte
	free  chan []byte
	done  chan struct{}
	mu    sync.Mutex
	err   error
}

// New returns a Writer that hands w chunks of chunk bytes.
func New(w io.Writer, chunk int) *Writer {
	p := &Writer{chunk: chunk, full: make(chan []byte, 2), free: make(chan []byte, 3), done: make(chan struct{})}
	for i := 0; i < 2; i++ {
		p.free <- make([]byte, 0, chunk)
	}
	p.cur = make([]byte, 0, chunk)
	go func() {
		defer close(p.done)
		for b := range p.full {
			if p.failed() == nil {
				if _, err := w.Write(b); err != nil {
					p.mu.Lock()
					p.err = err
					p.mu.Unlock()
				}
			}
			p.free <- b[:0]
		}
	}()
	return p
}

func (p *Writer) failed() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func (p *Writer) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		if err := p.failed(); err != nil {
			return 0, err
		}
		take := min(p.chunk-len(p.cur), len(b))
		p.cur = append(p.cur, b[:take]...)
		b = b[take:]
		if len(p.cur) == p.chunk {
			p.full <- p.cur
			p.cur = <-p.free
		}
	}
	return n, nil
}

// Close sends what is left and waits until w has it all.
func (p *Writer) Close() error {
	if len(p.cur) > 0 {
		p.full <- p.cur
		p.cur = nil
	}
	close(p.full)
	<-p.done
	return p.failed()
}
