// Package storepath says what a Nix store path is, by Nix's own rules, so
// that strings from untrusted places (image annotations, a daemon's
// answers) are checked before they reach the file system or Nix.
package storepath

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
)

// DefaultDir is Nix's store directory. Other store directories exist only
// on hosts that build everything themselves (binary caches cannot serve
// them); this project supports the default one.
const DefaultDir = "/nix/store"

const (
	hashLen    = 32
	maxNameLen = 211
	// base32 is Nix's base-32 alphabet: digits and letters without e, o, u, t.
	base32 = "0123456789abcdfghijklmnpqrsvwxyz"
)

// Check returns nil if p is a store path of DefaultDir: the store
// directory, a slash, and one path component that is a 32-character Nix
// hash, a dash and a name of Nix's characters. Anything else — another
// directory, "..", a second component, a NUL, a newline, an option such as
// "--option" — is an error of kind errdefs.ErrInvalidArgument that names it.
func Check(p string) error {
	if why := problem(p); why != "" {
		return fmt.Errorf("%q is not a Nix store path (%s): %w", p, why, errdefs.ErrInvalidArgument)
	}
	return nil
}

// CheckAll checks every path and names all that are not store paths at once.
func CheckAll(paths []string) error {
	var bad []string
	for _, p := range paths {
		if why := problem(p); why != "" {
			bad = append(bad, fmt.Sprintf("%q (%s)", p, why))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("not Nix store paths: %s: %w", strings.Join(bad, ", "), errdefs.ErrInvalidArgument)
	}
	return nil
}

// problem says what makes p not a store path, or "".
func problem(p string) string {
	base, ok := strings.CutPrefix(p, DefaultDir+"/")
	if !ok {
		return "not in " + DefaultDir
	}
	if len(base) < hashLen+2 || base[hashLen] != '-' {
		return "not HASH-NAME below " + DefaultDir
	}
	for _, c := range []byte(base[:hashLen]) {
		if strings.IndexByte(base32, c) < 0 {
			return fmt.Sprintf("%q is not a Nix base-32 character", c)
		}
	}
	name := base[hashLen+1:]
	if len(name) > maxNameLen {
		return fmt.Sprintf("name longer than %d characters", maxNameLen)
	}
	if name == "." || name == ".." || strings.HasPrefix(name, ".-") || strings.HasPrefix(name, "..-") {
		return "name is . or .."
	}
	for _, c := range []byte(name) {
		switch {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case strings.IndexByte("+-._?=", c) >= 0:
		default:
			return fmt.Sprintf("%q is not allowed in a store path name", c)
		}
	}
	return ""
}
