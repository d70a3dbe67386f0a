// Package errkind is the one table of what a failed image request was, as
// each boundary tells it: the builds_total metric's result, the
// distribution endpoint's HTTP status and error code. (Across the daemon's
// API, errors keep their errdefs kind through containerd's errgrpc.)
package errkind

import (
	"context"
	"errors"
	"net/http"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
)

// Kind is one row of the table.
type Kind struct {
	Result string // builds_total{result}
	Status int    // HTTP status
	Code   string // distribution-spec error code
	// Retry says the client may try again soon (Retry-After).
	Retry bool
	// Internal says the request failed on this side: logged as a warning
	// and its message (which may carry Nix's log) shortened for clients.
	Internal bool
	// Errdefs is the kind an error of this row has for a client of the
	// daemon's API (nil: whatever kind the error itself has).
	Errdefs error
}

// table is matched in order: the first row whose test holds is the kind.
// What was found comes before a timeout: an answer that arrived as the
// deadline passed (wrapped in it) is still that answer.
var table = []struct {
	is   func(error) bool
	kind Kind
}{
	// Not a package: the image names something that is not one, as a tag
	// a registry does not have.
	{func(err error) bool { return errors.As(err, new(*nixbuild.NotPackageError)) },
		Kind{Result: "invalid", Status: http.StatusNotFound, Code: "MANIFEST_UNKNOWN", Errdefs: errdefs.ErrNotFound}},
	{errdefs.IsNotFound,
		Kind{Result: "not_found", Status: http.StatusNotFound, Code: "MANIFEST_UNKNOWN", Errdefs: errdefs.ErrNotFound}},
	{func(err error) bool { return errors.As(err, new(*nixbuild.RefusedError)) },
		Kind{Result: "refused", Status: http.StatusForbidden, Code: "DENIED", Errdefs: errdefs.ErrPermissionDenied}},
	{errdefs.IsInvalidArgument,
		Kind{Result: "invalid", Status: http.StatusBadRequest, Code: "NAME_INVALID", Errdefs: errdefs.ErrInvalidArgument}},
	{errdefs.IsPermissionDenied,
		Kind{Result: "invalid", Status: http.StatusForbidden, Code: "DENIED", Errdefs: errdefs.ErrPermissionDenied}},
	{errdefs.IsResourceExhausted,
		Kind{Result: "busy", Status: http.StatusTooManyRequests, Code: "TOOMANYREQUESTS", Retry: true, Errdefs: errdefs.ErrResourceExhausted}},
	{func(err error) bool { return errors.Is(err, context.DeadlineExceeded) },
		Kind{Result: "timeout", Status: http.StatusInternalServerError, Code: "UNKNOWN", Internal: true, Errdefs: context.DeadlineExceeded}},
}

// failed is every other error's kind.
var failed = Kind{Result: "failed", Status: http.StatusInternalServerError, Code: "UNKNOWN", Internal: true}

// Of is the kind of err, which must not be nil.
func Of(err error) Kind {
	for _, row := range table {
		if row.is(err) {
			return row.kind
		}
	}
	return failed
}

// Carried is err as it crosses the daemon's API: its message, with the
// errdefs kind of its row, so that what the table decides (an answer that
// came as the deadline passed is that answer; a revision the source lacks
// is not found) is what the client reads, whatever else err wraps.
func Carried(err error) error {
	if err == nil {
		return nil
	}
	if kind := Of(err).Errdefs; kind != nil {
		return kinded{msg: err.Error(), kind: kind}
	}
	return err
}

// kinded is a message of a kind.
type kinded struct {
	msg  string
	kind error
}

func (k kinded) Error() string { return k.msg }
func (k kinded) Unwrap() error { return k.kind }
