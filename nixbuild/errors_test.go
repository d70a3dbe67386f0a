package nixbuild

import (
	"errors"
	"testing"
)

func TestCollected(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&BuildError{Stage: "query", Log: "error: path '/nix/store/fqh139wzb0il88fai1710pkfi3gvdspl-coreutils-9.1' is not valid", Err: errors.New("nix: exit status 1")}, true},
		{&BuildError{Stage: "query", Err: errors.New("nix path-info: /nix/store/x is not valid")}, true},
		{&BuildError{Stage: "build", Log: "error: path '/nix/store/x' is not valid", Err: errors.New("nix-build: exit status 1")}, false},
		{&BuildError{Stage: "query", Log: "error: something else", Err: errors.New("exit status 1")}, false},
		{errors.New("is not valid"), false},
	} {
		if got := collected(tc.err); got != tc.want {
			t.Errorf("collected(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
