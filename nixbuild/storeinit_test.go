package nixbuild

import (
	"context"
	"os"
	"path/filepath"
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
