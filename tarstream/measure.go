package tarstream

import (
	"io"

	"github.com/opencontainers/go-digest"
)

// Measurer passes writes through to an io.Writer and records the digest and
// size of everything written, so a layer is described as it streams.
type Measurer struct {
	w        io.Writer
	digester digest.Digester
	size     int64
}

// Measure wraps w.
func Measure(w io.Writer) *Measurer {
	return &Measurer{w: w, digester: digest.Canonical.Digester()}
}

func (m *Measurer) Write(p []byte) (int, error) {
	n, err := m.w.Write(p)
	m.digester.Hash().Write(p[:n])
	m.size += int64(n)
	return n, err
}

// Digest is the sha256 digest of what was written so far.
func (m *Measurer) Digest() digest.Digest { return m.digester.Digest() }

// Size is how many bytes were written so far.
func (m *Measurer) Size() int64 { return m.size }
