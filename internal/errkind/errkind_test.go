package errkind

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/containerd/errdefs/pkg/errgrpc"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

func TestOf(t *testing.T) {
	for _, tc := range []struct {
		err          error
		result, code string
		status       int
		retry, logIt bool
	}{
		{fmt.Errorf("nix: %w", context.DeadlineExceeded), "timeout", "UNKNOWN", 500, false, true},
		{&nixbuild.NotFoundError{Packages: []string{"x"}}, "not_found", "MANIFEST_UNKNOWN", 404, false, false},
		{&nixbuild.NotPackageError{Attributes: []string{"lib"}}, "invalid", "MANIFEST_UNKNOWN", 404, false, false},
		{&nixbuild.RefusedError{Packages: []string{"x"}}, "refused", "DENIED", 403, false, false},
		{fmt.Errorf("bad name: %w", errdefs.ErrInvalidArgument), "invalid", "NAME_INVALID", 400, false, false},
		{fmt.Errorf("not allowed: %w", errdefs.ErrPermissionDenied), "invalid", "DENIED", 403, false, false},
		{fmt.Errorf("queue full: %w", errdefs.ErrResourceExhausted), "busy", "TOOMANYREQUESTS", 429, true, false},
		{&nixbuild.BuildError{Stage: "build", Err: errors.New("exit 1")}, "failed", "UNKNOWN", 500, false, true},
		// A timed-out Nix is a timeout; an answer that came as the
		// deadline passed is that answer.
		{fmt.Errorf("%w (%w)", context.DeadlineExceeded, &nixbuild.BuildError{Stage: "build", Err: errors.New("killed")}), "timeout", "UNKNOWN", 500, false, true},
		{fmt.Errorf("%w (%w)", context.DeadlineExceeded, &nixbuild.RefusedError{Packages: []string{"x"}}), "refused", "DENIED", 403, false, false},
		{errors.New("anything"), "failed", "UNKNOWN", 500, false, true},
	} {
		k := Of(tc.err)
		if k.Result != tc.result || k.Code != tc.code || k.Status != tc.status || k.Retry != tc.retry || k.Internal != tc.logIt {
			t.Errorf("Of(%v) = %+v", tc.err, k)
		}
		// Across the daemon's API (errgrpc), the error is of the same
		// kind, with the same message.
		back := errgrpc.ToNative(errgrpc.ToGRPC(Carried(tc.err)))
		if Of(back).Code != k.Code || !strings.HasPrefix(back.Error(), tc.err.Error()) {
			t.Errorf("%v came across the API as %v (code %s, want %s)", tc.err, back, Of(back).Code, k.Code)
		}
	}
}
