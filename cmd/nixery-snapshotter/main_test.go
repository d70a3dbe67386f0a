package main

import (
	"bytes"
	"context"
	"flag"
	"slices"
	"strings"
	"testing"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

func TestParseInterspersed(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	ns := fs.String("namespace", "", "")
	kv := keyValues{}
	fs.Var(kv, "nix-option", "")
	pos, err := parseInterspersed(fs, []string{"--nix-option", "substituters=", "nix.local/htop", "--namespace", "k8s.io", "--", "--odd"})
	if err != nil {
		t.Fatal(err)
	}
	if *ns != "k8s.io" || !slices.Equal(pos, []string{"nix.local/htop", "--odd"}) {
		t.Errorf("namespace %q positional %v", *ns, pos)
	}
	if v, ok := kv["substituters"]; !ok || v != "" {
		t.Errorf("nix options %v", kv)
	}
	if err := kv.Set("novalue"); err == nil {
		t.Error("NAME without =VALUE accepted")
	}
}

func TestRunUsage(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := run(context.Background(), []string{"frobnicate"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Errorf("unknown command: %v", err)
	}
	if err := run(context.Background(), []string{"pull"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "pull takes an image reference, got 0") {
		t.Errorf("pull without a reference: %v", err)
	}
	if err := run(context.Background(), []string{"export", "nix.local/htop"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "export takes an image reference and a file, got 1") {
		t.Errorf("export without a file: %v", err)
	}
	if err := run(context.Background(), []string{"serve", "x"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "serve takes no arguments") {
		t.Errorf("serve with an argument: %v", err)
	}
	if err := run(context.Background(), []string{"pull", "--pkgs-path", "/a", "--pkgs-git", "b", "nix.local/htop"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "more than one package source") {
		t.Errorf("two sources: %v", err)
	}
}

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--version"}, &out, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "nixery-snapshotter ") || len(strings.TrimSpace(out.String())) <= len("nixery-snapshotter ") {
		t.Errorf("--version printed %q", out.String())
	}
}

func TestDisplay(t *testing.T) {
	var plain bytes.Buffer
	d := newDisplay(&plain)
	d.Event(progress.Event{Kind: progress.KindNix, Text: "building htop"})
	d.Event(progress.Event{Kind: progress.KindLayer, Text: "layer 1/2"})
	d.done()
	if got := plain.String(); got != "  nix: building htop\nlayer 1/2\n" {
		t.Errorf("plain: %q", got)
	}
	var tty bytes.Buffer
	d = &display{w: &tty, width: 20}
	d.Event(progress.Event{Kind: progress.KindNix, Text: "building a derivation with a long name"})
	d.Event(progress.Event{Kind: progress.KindNix, Text: "done"})
	d.Event(progress.Event{Kind: progress.KindStep, Text: "layer 1/2"})
	d.Event(progress.Event{Kind: progress.KindNix, Text: "x"})
	d.done()
	want := "\r\033[K  nix: building a …\r\033[K  nix: done\r\033[Klayer 1/2\n\r\033[K  nix: x\r\033[K"
	if got := tty.String(); got != want {
		t.Errorf("terminal: %q\nwant      %q", got, want)
	}
}
