package testutil

import (
	"crypto/sha256"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// HashFiles reads every regular file below paths once through sha256 (Go's,
// SHA-NI where the CPU has it) and returns how many bytes it read: the least
// any packing of those files must do, against which benchmarks measure.
func HashFiles(tb testing.TB, paths ...string) int64 {
	tb.Helper()
	var n int64
	h := sha256.New()
	for _, p := range paths {
		err := filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			m, err := io.Copy(h, f)
			n += m
			return err
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	return n
}
