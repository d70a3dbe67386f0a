package plugin

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, fmt.Sprintf("c%d.toml", time.Now().UnixNano()))
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfg, err := LoadConfig(write(`
[containerd]
namespace = "k8s.io"
[nix]
pkgs_path = "` + dir + `"
timeout = "90s"
[nix.options]
substituters = ""
[image]
max_layers = 20
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Containerd.Namespace != "k8s.io" || cfg.Containerd.Address != "/run/containerd/containerd.sock" ||
		time.Duration(cfg.Nix.Timeout) != 90*time.Second || cfg.Image.MaxLayers != 20 || cfg.Image.Host != "nix.local" {
		t.Errorf("config %+v", cfg)
	}
	if v, ok := cfg.Nix.Options["substituters"]; !ok || v != "" {
		t.Errorf("options %v", cfg.Nix.Options)
	}

	if _, err := LoadConfig(write("[nix]\npkgs_pth = \"x\"\n")); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "pkgs_pth") {
		t.Errorf("unknown key: %v", err)
	}
	if _, err := LoadConfig(write("[nix]\ntimeout = \"soon\"\n")); err == nil {
		t.Error("bad duration accepted")
	}
	if _, err := LoadConfig(filepath.Join(dir, "missing.toml")); err == nil {
		t.Error("missing file accepted")
	}
}

func TestNixSource(t *testing.T) {
	if _, err := (NixConfig{PkgsPath: "/a", PkgsGit: "b"}).Source(); !errdefs.IsInvalidArgument(err) {
		t.Errorf("two sources: %v", err)
	}
	if _, err := (NixConfig{PkgsPath: t.TempDir()}).Source(); err == nil || !strings.Contains(err.Error(), "default.nix") {
		t.Errorf("path without default.nix: %v", err)
	}
	if src, err := (NixConfig{}).Source(); err != nil || src.String() != "channel:<nixpkgs>" {
		t.Errorf("default source %v, %v", src, err)
	}
}

// The example configuration documents the defaults: it must load and say
// exactly what DefaultConfig does.
func TestConfigExample(t *testing.T) {
	t.Setenv("CONTAINERD_NAMESPACE", "")
	cfg, err := LoadConfig("../config.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprintf("%+v", cfg), fmt.Sprintf("%+v", DefaultConfig()); got != want {
		t.Errorf("config.toml.example says\n%s\ndefaults are\n%s", got, want)
	}
}

func TestCommand(t *testing.T) {
	pkgs := []nixbuild.Package{{Name: "pause", MainProgram: "pause"}, {Name: "htop"}, {Name: "cacert", MainProgram: "x"}}
	for _, tc := range []struct {
		ref  string
		want []string
	}{
		{"nix.local/shell", []string{"bash"}},
		{"nix.local/shell/pause", []string{"bash"}},
		{"nix.local/pause", []string{"pause"}},
		{"nix.local/htop", nil},
		{"nix.local/htop/pause", nil},
	} {
		img, err := resolver.Parse(tc.ref)
		if err != nil {
			t.Fatal(err)
		}
		if got := command(img, pkgs); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.ref, got, tc.want)
		}
	}
}

// push_to URIs reach Nix with the signing key in their query, as Nix
// reads it; what Nix cannot read is refused at start.
func TestNixConfigPusher(t *testing.T) {
	key := filepath.Join(t.TempDir(), "cache key.sec")
	if err := os.WriteFile(key, []byte("k"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := NixConfig{PushTo: []string{"file:///srv/cache?compression=zstd", "https://cache.example.org"}, PushSecretKey: key}.Pusher(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(context.Background())
	// Nix decodes %XX only: a space is %20, never +; the rest as written.
	esc := strings.ReplaceAll(strings.ReplaceAll(key, "/", "%2F"), " ", "%20")
	want := []string{"file:///srv/cache?compression=zstd&secret-key=" + esc, "https://cache.example.org?secret-key=" + esc}
	if !strings.Contains(key, " ") {
		t.Fatal("the key's path has no space to escape")
	}
	if got := p.Targets(); !slices.Equal(got, want) {
		t.Errorf("targets %q, want %q", got, want)
	}
	// Unsigned, any store Nix copies to.
	unsigned, err := NixConfig{PushTo: []string{"ssh://cache-host"}}.Pusher(nil)
	if err != nil || !slices.Equal(unsigned.Targets(), []string{"ssh://cache-host"}) {
		t.Errorf("unsigned ssh push: %v", err)
	} else {
		unsigned.Close(context.Background())
	}
	for _, bad := range []NixConfig{
		{PushTo: []string{"/srv/cache"}},
		{PushTo: []string{"file:///srv/cache?secret-key=/a"}, PushSecretKey: key},
		{PushSecretKey: key},
		{PushTo: []string{"ssh://cache-host"}, PushSecretKey: key},
		{PushTo: []string{"file:///srv/cache"}, PushSecretKey: filepath.Join(t.TempDir(), "missing")},
	} {
		if p, err := bad.Pusher(nil); err == nil {
			p.Close(context.Background())
			t.Errorf("%+v accepted", bad)
		}
	}
}
