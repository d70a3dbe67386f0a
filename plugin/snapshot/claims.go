package snapshot

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/privdir"
	"github.com/nixery-snapshotter/nixery-snapshotter/layering/labels"
)

// Claims are the layer descriptions this node's builds made. Any image can
// carry the labels of a layer that names store paths; only those this node
// made itself (or, if the operator says so, any) are materialised from the
// store. A layer an image copies from one of this node's gets exactly the
// paths this node built for it, no other.
//
// A claim is a file named by the digest of the layer's nixery labels and
// the chain ID it is a layer of (so that another image cannot commit it
// as the layer of some other chain), in a directory only root can write: no shared state but the file system, so
// that the CLI and the daemon, running or not, agree. Manifests carry no
// node secret, so the same store paths give the same image on every node.
type Claims struct {
	dir string
}

// OpenClaims opens (or makes) the claims directory dir. It must be root's
// (or this user's) and writable by no one else, nor any directory above it.
func OpenClaims(dir string) (*Claims, error) {
	if err := privdir.Make(dir); err != nil {
		return nil, fmt.Errorf("layer claims: %w", err)
	}
	return &Claims{dir: dir}, nil
}

// claimKey is the digest of the nixery labels in layer and of chain, or
// "" if there are no such labels.
func claimKey(layer map[string]string, chain string) string {
	h := sha256.New()
	h.Write([]byte(chain))
	n := 0
	for _, k := range slices.Sorted(maps.Keys(layer)) {
		if !strings.HasPrefix(k, labels.Prefix) {
			continue
		}
		n++
		for _, s := range []string{k, layer[k]} {
			_ = binary.Write(h, binary.LittleEndian, uint64(len(s)))
			h.Write([]byte(s))
		}
	}
	if n == 0 {
		return ""
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Record remembers the nixery labels of a layer this node made, as the
// layer whose snapshot is chain.
func (c *Claims) Record(labels map[string]string, chain string) error {
	key := claimKey(labels, chain)
	if key == "" {
		return nil
	}
	p := filepath.Join(c.dir, key[:2], key)
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("recording layer claim: %w", err)
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("recording layer claim: %w", err)
	}
	return f.Close()
}

// Made reports whether this node made a layer with labels' nixery labels
// as the layer whose snapshot is chain.
func (c *Claims) Made(labels map[string]string, chain string) bool {
	key := claimKey(labels, chain)
	if c == nil || key == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(c.dir, key[:2], key))
	return err == nil
}
