package nixbuild

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
)

// NotFoundError names every requested package the package set lacks.
type NotFoundError struct {
	Packages []string
}

func (e *NotFoundError) Error() string {
	return fmt.Sprintf("could not find Nix packages: [%s]", strings.Join(e.Packages, " "))
}

// Is makes errdefs.IsNotFound true for it.
func (e *NotFoundError) Is(target error) bool { return target == errdefs.ErrNotFound }

// RefusedError names every requested package that the package set refuses
// (nixpkgs: unfree, broken, insecure, a removed alias), each with the
// package set's reason.
type RefusedError struct {
	Packages []string
	Reasons  map[string]string
}

func (e *RefusedError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "the package set refuses: [%s]", strings.Join(e.Packages, " "))
	for _, p := range e.Packages {
		fmt.Fprintf(&b, "\n%s: %s", p, e.Reasons[p])
	}
	return b.String()
}

// Is makes errdefs.IsPermissionDenied true for it.
func (e *RefusedError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// NotPackageError names requested attributes that exist but are not
// derivations (a nested package set, a function).
type NotPackageError struct {
	Attributes []string
}

func (e *NotPackageError) Error() string {
	return fmt.Sprintf("not Nix packages (attribute sets or functions, not derivations): [%s]", strings.Join(e.Attributes, " "))
}

// Is makes errdefs.IsInvalidArgument true for it.
func (e *NotPackageError) Is(target error) bool { return target == errdefs.ErrInvalidArgument }

// BuildError is a failed Nix evaluation or build, with the end of its log.
type BuildError struct {
	Stage string // "fetch", "evaluate", "build" or "query"
	Log   string // the last lines Nix wrote to stderr
	// Shown says every line of the log went to a person already (the
	// Builder's progress): the message does not repeat them.
	Shown bool
	Err   error
}

func (e *BuildError) Error() string {
	msg := fmt.Sprintf("nix %s failed: %v", e.Stage, e.Err)
	switch {
	case e.Log != "" && e.Shown:
		msg += " (Nix's log is above)"
	case e.Log != "":
		msg += "\n--- end of nix log ---\n" + e.Log
	}
	return msg
}

// NoSourceError says no package source is configured and the Nix search
// path has none either.
type NoSourceError struct{ Lookup string }

func (e *NoSourceError) Error() string {
	return fmt.Sprintf("no package source: <%s> is not on the Nix search path; set --pkgs-path, --pkgs-git or --pkgs-channel, [nix] pkgs_path, pkgs_git or pkgs_channel, or NIX_PATH=%s=...", e.Lookup, e.Lookup)
}

// Is makes errdefs.IsFailedPrecondition true for it.
func (e *NoSourceError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

func (e *BuildError) Unwrap() error { return e.Err }
