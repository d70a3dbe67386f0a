package nixbuild

import (
	"fmt"
	"regexp"
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
	Stage string // "fetch", "evaluate", "build", "query" or "push"
	Log   string // the last lines Nix wrote to stderr
	// Shown says every line of the log went to a person already (the
	// request's progress sink): the message does not repeat them.
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

// RevisionError says the package source has no revision the image tag
// names (a git ref or commit that does not exist): not found, as a tag a
// registry does not have.
type RevisionError struct {
	Source string // the configured source
	Tag    string
	Reason string // Nix's message
	Err    error  // Nix's failure, a *BuildError
}

func (e *RevisionError) Error() string {
	return fmt.Sprintf("package source %s has no revision %q: %s", e.Source, e.Tag, e.Reason)
}

func (e *RevisionError) Unwrap() error { return e.Err }

// Is makes errdefs.IsNotFound true for it.
func (e *RevisionError) Is(target error) bool { return target == errdefs.ErrNotFound }

// noRevision matches what the Nix versions and git say when a ref or
// commit does not exist (2.8 relays git's words, 2.19+ libgit2's)...
var noRevision = regexp.MustCompile(`(?i)revspec '[^']*' not found|unknown revision|cannot find git revision|couldn't find remote ref|getting git object '[0-9a-f]+': object not found`)

// ...unless the remote could not be asked: Nix then looks in the clone it
// has, which may just not have the revision yet.
var remoteUnreachable = regexp.MustCompile(`(?i)could not update local clone|could not update cached head|unable to access|could not resolve host|connection (refused|timed out)`)

// isNoRevision says a fetch's log is that of a revision that does not exist.
func isNoRevision(log string) bool {
	return noRevision.MatchString(log) && !remoteUnreachable.MatchString(log)
}
