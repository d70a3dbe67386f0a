package integration

import (
	"strings"
	"testing"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

// A flake is a package source for pull: an image of its packages runs, and
// a tag naming one of its commits builds that commit's package set.
func TestPullFlake(t *testing.T) {
	testutil.RequireCommands(t, "git")
	repo := t.TempDir()
	first := testutil.FlakeRepo(t, repo, `tool = pkgs.htop;`)
	testutil.FlakeRepo(t, repo, `tool = pkgs.jq;`)
	e := newNixEnv(t, func(e *env) {
		e.pkgs = ""
		e.extraNix = map[string]any{"pkgs_flake": "git+file://" + repo, "revisions": []string{"latest", first}}
	})

	e.mustPull("--snapshotter", "overlayfs", "nix.local/shell/tool")
	const which = "htop --version 2>/dev/null || jq --version"
	if out := e.runOn("overlayfs", "nix.local/shell/tool", "bash", "-c", which); !strings.HasPrefix(out, "jq-") {
		t.Errorf("tool at the flake's head is not jq: %q", out)
	}
	e.mustPull("--snapshotter", "overlayfs", "nix.local/shell/tool:"+first)
	if out := e.runOn("overlayfs", "nix.local/shell/tool:"+first, "bash", "-c", which); !strings.Contains(out, htopVersion()) {
		t.Errorf("tool at %s is not htop: %q", first, out)
	}
}
