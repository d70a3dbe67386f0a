package resolver

import (
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParse(t *testing.T) {
	with := func(p ...string) []string { return append(p, "cacert", "iana-etc") }
	shell := []string{"bashInteractive", "coreutils", "moreutils", "nano"}
	for _, tc := range []struct {
		ref      string
		name     string
		tag      string
		pkgs     []string
		platform Platform
	}{
		{"nix.local/htop", "nix.local/htop", "latest", with("htop"), amd64},
		{"nix.local/git/htop", "nix.local/git/htop", "latest", with("git", "htop"), amd64},
		{"nix.local/htop/git", "nix.local/htop/git", "latest", with("git", "htop"), amd64},
		{"nix.local/htop:1.2", "nix.local/htop", "1.2", with("htop"), amd64},
		{"nix.local/shell", "nix.local/shell", "latest", with(shell...), amd64},
		{"nix.local/shell/htop", "nix.local/shell/htop", "latest", with(append(shell, "htop")...), amd64},
		{"nix.local/arm64/htop", "nix.local/arm64/htop", "latest", with("htop"), arm64},
		{"nix.local/shell/arm64", "nix.local/shell/arm64", "latest", with(shell...), arm64},
		{"nix.local/arm64/shell", "nix.local/arm64/shell", "latest", with(shell...), arm64},
		// Meta-packages count only at the front.
		{"nix.local/htop/shell", "nix.local/htop/shell", "latest", with("htop", "shell"), amd64},
		{"nix.local/xorg.xev", "nix.local/xorg.xev", "latest", with("xorg.xev"), amd64},
		{"nix.local/haskellpackages.stylish-haskell", "nix.local/haskellpackages.stylish-haskell", "latest", with("haskellpackages.stylish-haskell"), amd64},
		{"nix.local/1password", "nix.local/1password", "latest", with("1password"), amd64},
		{"nix.local/cacert/htop/htop", "nix.local/cacert/htop/htop", "latest", with("htop"), amd64},
		{"nix.local/shell/coreutils", "nix.local/shell/coreutils", "latest", with(shell...), amd64},
		{"nix.local/htop:0123456789abcdef0123456789abcdef01234567", "nix.local/htop", "0123456789abcdef0123456789abcdef01234567", with("htop"), amd64},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			img, err := Parse(tc.ref, WithDefaultPlatform(amd64))
			if err != nil {
				t.Fatal(err)
			}
			want := slices.Clone(tc.pkgs)
			slices.Sort(want)
			if img.Name != tc.name || img.Tag != tc.tag || !slices.Equal(img.Packages, want) || img.Platform != tc.platform {
				t.Errorf("got %+v, want name %s tag %s packages %v platform %v", img, tc.name, tc.tag, want, tc.platform)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	for _, tc := range []struct{ ref, why string }{
		{"", "empty"},
		{"nix.local", "must start with nix.local/"},
		{"nix.local/", "invalid reference format"},
		{"htop", "must start with nix.local/"},
		{"docker.io/library/htop", "must start with nix.local/"},
		{"nix.local.evil/htop", "must start with nix.local/"},
		{"nix.local//htop", "invalid reference format"},
		{"nix.local/htop/", "invalid reference format"},
		{"nix.local/Htop", "must be lowercase"},
		{"nix.local/htop:", "invalid reference format"},
		{"nix.local/../etc/passwd", "invalid reference format"},
		{"nix.local/xorg..xev", "invalid reference format"},
		{"nix.local/.htop", "invalid reference format"},
		{"nix.local/htop.", "invalid reference format"},
		{"nix.local/-htop", "invalid reference format"},
		{"nix.local/_htop", "invalid reference format"},
		{"nix.local/htop${builtins.abort}", "invalid reference format"},
		{`nix.local/htop"`, "invalid reference format"},
		{"nix.local/a b", "invalid reference format"},
		{"nix.local/htop;rm", "invalid reference format"},
		{"nix.local/(import/etc)", "invalid reference format"},
		{"nix.local/hto\u0440", "invalid reference format"}, // Cyrillic er
		{"nix.local/htop\n", "invalid reference format"},
		{"nix.local/htop@sha256:" + strings.Repeat("a", 64), "digest references"},
		{"nix.local/" + strings.Repeat("a", 300), "repository name must not be more than 255 characters"},
		{"nix.local/htop:" + strings.Repeat("t", 129), "invalid reference format"},
		{"nix.local/" + strings.TrimSuffix(strings.Repeat("a/", 65), "/"), "at most 64"},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			_, err := Parse(tc.ref)
			if err == nil {
				t.Fatal("parsed")
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("%v is not InvalidArgument", err)
			}
			if !strings.Contains(err.Error(), tc.why) {
				t.Errorf("error %q does not say %q", err, tc.why)
			}
		})
	}
}

func TestParseHost(t *testing.T) {
	img, err := Parse("nodebuilder:5000/htop", WithHost("nodebuilder:5000"))
	if err != nil {
		t.Fatal(err)
	}
	if img.Ref() != "nodebuilder:5000/htop:latest" {
		t.Errorf("Ref() = %s", img.Ref())
	}
	if _, err := Parse("nix.local/htop", WithHost("nodebuilder:5000")); err == nil {
		t.Error("nix.local accepted under another host")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"nix.local/shell/htop", "nix.local/arm64/xorg.xev:v1", "nix.local/../x", "nix.local/a${b}"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		img, err := Parse(ref)
		if err != nil {
			return
		}
		for _, p := range img.Packages {
			if strings.ContainsAny(p, "${}\"'\\ /;()\n") || strings.Contains(p, "..") {
				t.Fatalf("package name %q from %q could be read as Nix code", p, ref)
			}
		}
	})
}

func TestParseRequested(t *testing.T) {
	for ref, want := range map[string][]string{
		"nix.local/shell":            nil,
		"nix.local/shell/arm64/htop": {"htop"},
		"nix.local/htop/git/htop":    {"git", "htop"},
		"nix.local/cacert":           {"cacert"},
	} {
		img, err := Parse(ref)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(img.Requested, want) {
			t.Errorf("%s: requested %v, want %v", ref, img.Requested, want)
		}
	}
}
