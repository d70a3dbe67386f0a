package nixbuild

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// A store never opened is opened once, by one process alone, before any
// Nix command runs, however many start at once: Nix fails one of two
// processes that set up a fresh store together.
func TestStoreOpenedAloneFirst(t *testing.T) {
	bin := t.TempDir()
	log := filepath.Join(bin, "log")
	// Each command says when it starts and ends; nix-store
	// --check-validity (the opening) fails the test's check if another
	// command runs meanwhile.
	script := `#!/bin/sh
echo "start $(basename $0) $*" >> ` + log + `
sleep 0.1
echo "end $(basename $0) $*" >> ` + log + `
`
	for _, name := range []string{"nix-store", "nix-instantiate", "nix"} {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b := New(Source{}, WithBinDir(bin))
	defer b.Close()
	var wg sync.WaitGroup
	for _, name := range []string{"nix-instantiate", "nix", "nix-store", "nix-instantiate"} {
		wg.Go(func() {
			if _, err := b.run(context.Background(), "test", name, "--run"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	out, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 10 || !strings.Contains(lines[0], "start nix-store") || !strings.Contains(lines[0], "--check-validity") || !strings.Contains(lines[1], "end nix-store") {
		t.Fatalf("want the store opened once, alone, first:\n%s", out)
	}
	if strings.Count(string(out), "--check-validity") != 2 {
		t.Errorf("the store opened more than once:\n%s", out)
	}
}

// Warm opens the store and asks Nix's version ahead of the first build,
// once; a version Nix did not give (not installed yet) is asked again by
// the build that needs it, and then no more; a store Nix was not there to
// open (nix-store missing) is opened by the next command.
func TestWarm(t *testing.T) {
	bin := t.TempDir()
	log, ready := filepath.Join(bin, "log"), filepath.Join(bin, "ready")
	script := `#!/bin/sh
echo "$(basename $0) $*" >> ` + log + `
if [ "$*" = --version ]; then
  [ -e ` + ready + ` ] || exit 1
  echo "nix (Nix) 2.33.1"
fi
`
	install := func(name string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	install("nix")
	calls := func(args string) int {
		out, _ := os.ReadFile(log)
		return strings.Count(string(out), args+"\n")
	}
	ctx := context.Background()
	b := New(Source{}, WithBinDir(bin))
	defer b.Close()
	b.Warm(ctx)
	b.beside.Wait()
	if n, v := calls("nix-store --check-validity"), calls("nix --version"); n != 0 || v != 1 {
		t.Fatalf("warming without nix-store: the store opened %d times, the version asked %d times; want 0 and 1", n, v)
	}
	install("nix-store")
	b.Warm(ctx)
	b.beside.Wait()
	if n, v := calls("nix-store --check-validity"), calls("nix --version"); n != 1 || v != 2 {
		t.Fatalf("warming again: the store opened %d times, the version asked %d times; want 1 and 2", n, v)
	}
	if got := b.pathInfoFormat(ctx); got != nil {
		t.Fatalf("path-info format %q from a Nix that gave no version", got)
	}
	if err := os.WriteFile(ready, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if got := b.pathInfoFormat(ctx); !slices.Equal(got, []string{"--json-format", "2"}) {
			t.Fatalf("path-info format %q from Nix 2.33", got)
		}
	}
	if n, v := calls("nix-store --check-validity"), calls("nix --version"); n != 1 || v != 4 {
		t.Errorf("the store opened %d times (want 1), the version asked %d times (want 4: three times unanswered, once answered)", n, v)
	}
}
