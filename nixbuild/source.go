package nixbuild

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
)

// commitHash is a full git commit id: a tag of this shape pins a revision.
var commitHash = regexp.MustCompile(`^[0-9a-f]{40}$`)

// LatestTag is the tag of the source's default revision.
const LatestTag = "latest"

// DefaultRevisions are the tags served unless the operator lists more:
// the source's default revision only. Another tag would make the node
// fetch and evaluate a revision whoever names an image chooses.
var DefaultRevisions = []string{LatestTag}

// Source is where package sets come from. The image tag selects a revision
// of it, as in Nixery: for git, a 40-hex tag is a commit, any other tag a
// ref and `latest` the default branch; for channels, a tag other than
// `latest` replaces the channel; a path has a single revision. Which tags
// are served at all is the operator's choice (WithRevisions).
type Source struct {
	kind string // "path", "git", "channel" or "flake"
	loc  string
}

// PathSource is a local directory whose default.nix is a package set (or a
// function `{ system ? ..., ... }` returning one), such as a nixpkgs checkout.
func PathSource(dir string) (Source, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Source{}, fmt.Errorf("package set path %q: %w", dir, err)
	}
	return Source{kind: "path", loc: abs}, nil
}

// GitSource is a git repository holding a package set at its top.
func GitSource(url string) Source { return Source{kind: "git", loc: url} }

// ChannelSource is a nixpkgs channel or commit ("nixos-24.05", a commit id,
// a tarball URL) or a Nix search path entry such as "<nixpkgs>".
func ChannelSource(name string) Source { return Source{kind: "channel", loc: name} }

// FlakeSource is a flake (a flake reference such as path:/srv/flake,
// git+file:///srv/flake or github:owner/repo) whose packages.<system>,
// then legacyPackages.<system>, are the package set. An image tag selects
// a revision as for git (rev= or ref= in the reference), except for a
// path: flake, which has one.
func FlakeSource(ref string) (Source, error) {
	u, err := url.Parse(ref)
	if err != nil || u.Scheme == "" || strings.ContainsAny(ref, " \t\n") {
		return Source{}, fmt.Errorf("flake %q is not a flake reference (such as path:/srv/flake, git+file:///srv/flake or github:owner/repo): %w", ref, errdefs.ErrInvalidArgument)
	}
	if (u.Scheme == "path" || strings.HasSuffix(u.Scheme, "+file")) && (u.Opaque != "" || !path.IsAbs(u.Path)) {
		// Relative to what? The daemon's directory is not the CLI's.
		return Source{}, fmt.Errorf("flake %q: a local flake needs an absolute path (path:/srv/flake, git+file:///srv/flake): %w", ref, errdefs.ErrInvalidArgument)
	}
	return Source{kind: "flake", loc: ref}, nil
}

// flakeRef is the flake reference of tag: the configured one, or it with
// the tag as its rev (a commit id) or ref.
func (s Source) flakeRef(tag string) string {
	u, err := url.Parse(s.loc)
	if err != nil || tag == "" || tag == LatestTag || u.Scheme == "path" {
		return s.loc
	}
	q := u.Query()
	q.Del("rev")
	q.Del("ref")
	if commitHash.MatchString(tag) {
		q.Set("rev", tag)
	} else {
		q.Set("ref", tag)
	}
	u.RawQuery = q.Encode()
	return u.String()
}

func (s Source) String() string { return s.kind + ":" + s.loc }

// IsZero reports whether no source was configured.
func (s Source) IsZero() bool { return s.kind == "" }

// Pinned reports whether the package set for tag is fixed, so that results
// built from it may be cached.
func (s Source) Pinned(tag string) bool {
	switch s.kind {
	case "git":
		return commitHash.MatchString(tag)
	case "channel":
		return commitHash.MatchString(s.revision(tag))
	case "flake":
		// A commit, or a reference locked by its content.
		u, err := url.Parse(s.flakeRef(tag))
		return err == nil && (commitHash.MatchString(u.Query().Get("rev")) || u.Query().Get("narHash") != "")
	}
	return false
}

// pin says what fixes the package set for tag where Pinned does not: the
// real location of a path or search path entry (from nixPath, as
// evaluation sees it) when it is inside storeDir — nix-channel keeps each
// generation of a channel there, so an update is another path — or, for
// a path that is a clean git work tree, its HEAD commit. "" when the
// package set may change unseen: a dirty work tree, a plain directory, a
// URL. It runs no Nix.
func (s Source) pin(ctx context.Context, tag, nixPath, storeDir string) string {
	arg, err := s.locate(tag)
	if err != nil {
		return ""
	}
	dir := arg["path"]
	if lookup := arg["lookup"]; lookup != "" {
		for _, e := range splitNixPath(s.searchPath(tag, nixPath)) {
			if d, ok := strings.CutPrefix(e, lookup+"="); ok && !strings.Contains(d, "://") {
				dir = d
				break
			}
		}
	}
	if dir == "" {
		return ""
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return ""
	}
	if store, err := filepath.EvalSymlinks(storeDir); err == nil {
		storeDir = store // /nix may be a symlink to another disk
	}
	if strings.HasPrefix(real, filepath.Clean(storeDir)+"/") {
		return "store:" + real
	}
	if s.kind == "path" {
		if commit := cleanGitHead(ctx, real); commit != "" {
			return "git:" + commit
		}
	}
	return ""
}

// cleanGitHead is the HEAD commit of the git work tree dir is the top
// of, if nothing in it differs from that commit: no change, staged or
// not, and no untracked or ignored file (a package set may read any file,
// or a directory, as nixpkgs' pkgs/by-name does). "" otherwise, or when
// git cannot tell. A directory within a work tree is not one: the rest of
// the tree, which it may import, is not its own.
//
// git runs as the work tree's owner, without the user's or the system's
// configuration: what the repository's own configuration makes it run (a
// clean filter, say) runs with no more rights than its owner has.
func cleanGitHead(ctx context.Context, dir string) string {
	info, err := os.Lstat(filepath.Join(dir, ".git"))
	if err != nil {
		return "" // no work tree here, and no git to run
	}
	owner, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "git", "-c", "core.fsmonitor=false", "-C", dir, "status",
		"--porcelain=v2", "--branch", "--untracked-files=all", "--ignored=traditional", "--ignore-submodules=none")
	// status writes nothing (the index may be read-only, or in use).
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=/nonexistent", "GIT_CONFIG_NOSYSTEM=1", "GIT_OPTIONAL_LOCKS=0", "LC_ALL=C"}
	if owner.Uid != uint32(os.Getuid()) {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: owner.Uid, Gid: owner.Gid}}
	}
	out, err := cmd.Output()
	if err != nil {
		return ""
	}
	var head string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if oid, ok := strings.CutPrefix(line, "# branch.oid "); ok {
			head = oid
		} else if !strings.HasPrefix(line, "#") && line != "" {
			return "" // a change, or an untracked or ignored file
		}
	}
	if !commitHash.MatchString(head) {
		return "" // no commit yet
	}
	return head
}

func (s Source) revision(tag string) string {
	if tag == "" || tag == LatestTag {
		return s.loc
	}
	return tag
}

// locate says where the package set for tag is: prepare.nix's `source`
// argument.
func (s Source) locate(tag string) (map[string]string, error) {
	arg := map[string]string{"type": s.kind}
	switch s.kind {
	case "path":
		// Where it really is: Nix (2.26) checks each component of a
		// symlink's target against the paths allowed, and a channel is a
		// symlink into the store, whose parents are not.
		arg["path"] = s.loc
		if real, err := filepath.EvalSymlinks(s.loc); err == nil {
			arg["path"] = real
		}
	case "git":
		arg["url"] = s.loc
		switch {
		case tag == "" || tag == LatestTag:
		case commitHash.MatchString(tag):
			arg["rev"] = tag
		default:
			arg["ref"] = tag
		}
	case "channel":
		rev := s.revision(tag)
		switch {
		case strings.HasPrefix(rev, "<") && strings.HasSuffix(rev, ">"):
			arg["lookup"] = strings.TrimSuffix(strings.TrimPrefix(rev, "<"), ">")
		case strings.Contains(rev, "://"):
			arg["url"] = rev
		default:
			arg["url"] = "https://github.com/NixOS/nixpkgs/archive/" + rev + ".tar.gz"
		}
	case "flake":
		// Fetched by evaluation itself (builtins.getFlake), which locks
		// it and its inputs.
		arg["flake"] = s.flakeRef(tag)
	default:
		return nil, fmt.Errorf("no package source configured: %w", errdefs.ErrFailedPrecondition)
	}
	return arg, nil
}

// fetchedFrom reports whether the package set for tag is fetched from a
// URL (git, a tarball) rather than read where it is.
func (s Source) fetchedFrom(tag string) bool {
	arg, err := s.locate(tag)
	return err == nil && arg["url"] != ""
}

// lookup is the search path entry a `<name>` source looks up, or "".
func (s Source) lookup() string {
	arg, err := s.locate(LatestTag)
	if err != nil {
		return ""
	}
	return arg["lookup"]
}

// argument is the JSON that prepare.nix reads as its `source` argument.
func (s Source) argument(tag string) (string, error) {
	arg, err := s.locate(tag)
	if err != nil {
		return "", err
	}
	b, err := json.Marshal(arg)
	return string(b), err
}

// access is what evaluating the package set for tag may read besides
// prepare.nix: the source's directory, or the URL it is fetched from (a
// search path entry such as <nixpkgs> is allowed by Nix itself).
func (s Source) access(tag string) (paths, uris []string, err error) {
	arg, err := s.locate(tag)
	if err != nil {
		return nil, nil, err
	}
	if p := arg["path"]; p != "" {
		paths = append(paths, p)
	}
	if u := arg["url"]; u != "" {
		uris = append(uris, u)
	}
	return paths, uris, nil
}

// searchPath is the Nix search path evaluation may see, from the
// inherited one (NIX_PATH): only the entry a `<name>` source looks up. An
// entry such as NixOS's nixos-config=/etc/nixos/configuration.nix would
// otherwise be readable by the package set, restricted or not.
func (s Source) searchPath(tag, inherited string) string {
	arg, err := s.locate(tag)
	if err != nil || arg["lookup"] == "" {
		return ""
	}
	var keep []string
	for _, e := range splitNixPath(inherited) {
		if strings.HasPrefix(e, arg["lookup"]+"=") {
			keep = append(keep, e)
		}
	}
	return strings.Join(keep, ":")
}

// splitNixPath splits NIX_PATH at its colons, but not at those of URLs.
func splitNixPath(p string) []string {
	var out []string
	for _, part := range strings.Split(p, ":") {
		if n := len(out); n > 0 && strings.HasPrefix(part, "//") {
			out[n-1] += ":" + part
			continue
		}
		if part != "" {
			out = append(out, part)
		}
	}
	return out
}

// Revisions are the tags a Builder serves, as path.Match patterns.
type Revisions []string

// tags lists the tags served that are not patterns, sorted.
func (r Revisions) tags() []string {
	var out []string
	for _, t := range r {
		if !strings.ContainsAny(t, `*?[\`) {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// check refuses a tag the operator did not allow, before anything is
// fetched: a not-found error, as for a tag a registry does not have.
func (r Revisions) check(tag string) error {
	if tag == "" {
		tag = LatestTag
	}
	if slices.ContainsFunc(r, func(pattern string) bool {
		ok, _ := path.Match(pattern, tag)
		return ok
	}) {
		return nil
	}
	return fmt.Errorf("tag %q is not a package-source revision this node serves (allowed: %s; the operator adds more with [nix] revisions): %w",
		tag, strings.Join(r, ", "), errdefs.ErrNotFound)
}
