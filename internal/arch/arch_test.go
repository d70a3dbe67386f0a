// Package arch holds the test of the module's shape: packages follow the
// data flow (ref → packages → closure → layers → tar → snapshots/content →
// image → containerd), each imports only those below it, and none holds
// much more than a quarter of the code.
package arch

import (
	"go/build"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

const module = "github.com/nixery-snapshotter/nixery-snapshotter/"

// tiers places every package of the module: a package imports only
// packages of lower tiers. A new package must be placed here.
var tiers = map[string]int{
	// Parts with no knowledge of images.
	"internal/listen":    0,
	"internal/privdir":   0,
	"internal/storelink": 0,
	"nixbuild/storepath": 0,
	"internal/progress":  0,
	"internal/pipelined": 0,
	"internal/version":   0,
	"internal/procdir":   1,
	"internal/snapmount": 2, // where snapshots are written, and temporary mounts
	"plugin/api":         1, // the daemon's API: a contract, below what serves it
	// The data flow.
	"resolver":               2,  // ref
	"nixbuild":               3,  // packages → closure
	"layering":               4,  // closure → layers
	"layering/labels":        4,  // how layers and snapshots say what they hold
	"internal/errkind":       4,  // what a failed request was, at every boundary
	"plugin/push":            4,  // closure → the fleet's binary caches
	"tarstream":              5,  // layers → tar
	"plugin/cache":           5,  // what was expensive to find out, remembered
	"plugin/snapshot/remote": 5,  // snapshots some of whose layers are made, not unpacked
	"tarstream/linked":       6,  // layers → directories of links to the store
	"plugin/snapshot":        7,  // tar / store → snapshots
	"plugin/fixed":           7,  // a built image, as containerd's pull finds images
	"plugin/layer":           8,  // layers described, stored on the way
	"plugin":                 9,  // → image → containerd
	"plugin/registry":        10, // the distribution endpoint
	"plugin/service":         11, // the configuration wired into the parts
	"cmd/nixery-snapshotter": 12,
}

// notPlaced are packages of tests, outside the product's flow.
var notPlaced = map[string]bool{"integration": true, "internal/testutil": true, "internal/arch": true}

const maxShare = 0.25

func TestShape(t *testing.T) {
	root := testutil.RepoRoot()
	lines := map[string]int{}
	imports := map[string][]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") || name == "testdata" || name == "hack") {
			return filepath.SkipDir
		}
		pkg, err := build.ImportDir(path, 0)
		if err != nil {
			return nil // no Go files
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		for _, f := range pkg.GoFiles {
			b, err := os.ReadFile(filepath.Join(path, f))
			if err != nil {
				return err
			}
			lines[rel] += strings.Count(string(b), "\n")
		}
		for _, imp := range pkg.Imports {
			if dep, ok := strings.CutPrefix(imp, module); ok {
				imports[rel] = append(imports[rel], dep)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	total := 0
	for pkg, n := range lines {
		if !notPlaced[pkg] {
			total += n
		}
	}
	for _, pkg := range slices.Sorted(maps.Keys(lines)) {
		n := lines[pkg]
		if notPlaced[pkg] {
			continue
		}
		tier, ok := tiers[pkg]
		if !ok {
			t.Errorf("package %s has no tier: place it in the data flow (internal/arch)", pkg)
			continue
		}
		for _, dep := range imports[pkg] {
			if notPlaced[dep] {
				t.Errorf("%s imports %s, which is for tests", pkg, dep)
			}
			if dt, ok := tiers[dep]; ok && dt >= tier {
				t.Errorf("%s (tier %d) imports %s (tier %d): imports point down the data flow only", pkg, tier, dep, dt)
			}
		}
		share := float64(n) / float64(total)
		if share > maxShare {
			t.Errorf("package %s holds %d of %d lines (%.0f %%): split it (at most %.0f %% each)", pkg, n, total, 100*share, 100*maxShare)
		}
		t.Logf("%-28s tier %d  %5d lines  %4.1f %%", pkg, tier, n, 100*share)
	}
	for pkg := range tiers {
		if _, ok := lines[pkg]; !ok {
			t.Errorf("tier table names %s, which has no code: remove it", pkg)
		}
	}
}
