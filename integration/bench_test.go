package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
	"github.com/nixery-snapshotter/nixery-snapshotter/nixbuild"
	"github.com/nixery-snapshotter/nixery-snapshotter/resolver"
)

// benchMiB is the size of the synthetic package in the provisioning
// benchmark: NIXERY_BENCH_MB, small by default so that CI runs it quickly.
func benchMiB(b *testing.B) int {
	if v := os.Getenv("NIXERY_BENCH_MB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("NIXERY_BENCH_MB=%q: want a positive number of MiB", v)
		}
		return n
	}
	return 16
}

// bigPackages writes a package set that adds `big`: size MiB of data in
// files of 16 KiB to 1 MiB, as real closures mix small and large files.
func bigPackages(b *testing.B, mib int) string { return bigPackagesT(b, mib) }

func bigPackagesT(b testing.TB, mib int) string {
	dir := b.TempDir()
	script := fmt.Sprintf(`set -e
mkdir -p $out/share/big
remaining=$((%d * 1024))
i=0
while [ $remaining -gt 0 ]; do
  kib=$(( (i %% 4 == 0) ? 1024 : 16 << (i %% 4) ))
  [ $kib -gt $remaining ] && kib=$remaining
  head -c $((kib * 1024)) /dev/urandom > $out/share/big/f$i
  remaining=$((remaining - kib)); i=$((i + 1))
done
mkdir -p $out/bin
printf '#!/usr/bin/env bash\necho big\n' > $out/bin/big
chmod +x $out/bin/big
(sleep 0.2 &) # see testdata/pkgs/builder.sh`, mib)
	src := fmt.Sprintf(`{ system ? builtins.currentSystem, ... }:
import %s { inherit system; } // {
  big = derivation {
    name = "big-%dmib"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin";
    args = [ "-c" %q ];
  };
}`, testutil.TestPkgs(), mib, script)
	if err := os.WriteFile(filepath.Join(dir, "default.nix"), []byte(src), 0o644); err != nil {
		b.Fatal(err)
	}
	return dir
}

// freeBytes is what the filesystem holding path has free, after a sync.
func freeBytes(b *testing.B, path string) int64 {
	syscall.Sync()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		b.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// BenchmarkColdProvision provisions nix.local/shell/big (store paths
// realised) into an empty containerd served by a fresh daemon, nothing of
// it known (no snapshot, blob or layer digest), with overlayfs, with the nix
// snapshotter, and the way Nixery does (gzip, loopback HTTP registry,
// containerd pull), side by side in each iteration, against reading the
// closure once through sha256; and with overlayfs into a second namespace
// (its layers known by then). Run it with hack/bench.sh; NIXERY_BENCH_MB
// sets the size.
func BenchmarkColdProvision(b *testing.B) {
	mib := benchMiB(b)
	pkgs := bigPackages(b, mib)
	e := newNixEnv(b, withPkgs(pkgs))
	const ref = "nix.local/shell/big"

	// Realise the closure first: this measures provisioning, not Nix builds.
	// Builders that write a GiB were seen killed (signal 9, no OOM report)
	// on these machines now and then: try again before giving up.
	var out []byte
	var err error
	for try := 0; try < 3; try++ {
		build := exec.Command("nix-build", "--no-out-link", "-A", "big", e.pkgs)
		for k, v := range testutil.NixOptions() {
			build.Args = append(build.Args, "--option", k, v)
		}
		if out, err = build.CombinedOutput(); err == nil {
			break
		}
	}
	if err != nil {
		b.Fatalf("building big: %v\n%s", err, out)
	}
	e.mustPull("--snapshotter", "nix", ref)
	m, _ := e.manifest(b, ref+":latest")
	var paths []string
	for _, l := range m.Layers {
		paths = append(paths, storePaths(l.Annotations)...)
	}
	closureBytes := testutil.HashFiles(b, paths...)
	var cfg ocispec.Image
	e.readJSON(b, m.Config, &cfg)

	var hashT, overlayT, secondT, nixT, nixeryT time.Duration
	var overlayDisk, nixDisk, cliPeak, daemonPeak int64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		e := newNixEnv(b, withPkgs(pkgs))
		b.StartTimer()
		start := time.Now()
		testutil.HashFiles(b, paths...)
		hashT += time.Since(start)

		for _, mode := range []struct {
			snapshotter string
			t           *time.Duration
			disk        *int64
		}{{"overlayfs", &overlayT, &overlayDisk}, {"nix", &nixT, &nixDisk}} {
			free := freeBytes(b, e.ctd.Dir)
			start := time.Now()
			e.mustPull("--snapshotter", mode.snapshotter, ref)
			*mode.t += time.Since(start)
			*mode.disk += free - freeBytes(b, e.ctd.Dir)
			if mode.snapshotter == "overlayfs" {
				start := time.Now()
				e.mustPull("--snapshotter", "overlayfs", "--namespace", "second", ref)
				secondT += time.Since(start)
			}
			b.StopTimer()
			if out := e.runOn(mode.snapshotter, ref, "big"); out != "big\n" {
				b.Fatalf("%s: big printed %q", mode.snapshotter, out)
			}
			e.removeImages(b, ref)
			b.StartTimer()
		}

		start = time.Now()
		name := nixeryStyle(b, e, m, cfg)
		nixeryT += time.Since(start)
		b.StopTimer()
		if out := e.runOn("overlayfs", name, "big"); out != "big\n" {
			b.Fatalf("nixery-style: big printed %q", out)
		}
		e.removeImages(b, strings.TrimSuffix(name, ":latest"))
		cliPeak, daemonPeak = max(cliPeak, e.peakRSS), max(daemonPeak, e.daemon.peakRSS())
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(float64(closureBytes)/(1<<20), "closure-MiB")
	b.ReportMetric(hashT.Seconds()/n, "sha256-s")
	b.ReportMetric(overlayT.Seconds()/n, "overlayfs-s")
	b.ReportMetric(nixT.Seconds()/n, "nix-s")
	b.ReportMetric(float64(overlayT)/float64(hashT), "overlayfs/sha256")
	b.ReportMetric(float64(nixT)/float64(hashT), "nix/sha256")
	b.ReportMetric(float64(secondT.Milliseconds())/n, "overlayfs-second-namespace-ms")
	b.ReportMetric(nixeryT.Seconds()/n, "nixery-style-s")
	b.ReportMetric(float64(nixeryT)/float64(overlayT), "nixery-style/overlayfs")
	b.ReportMetric(float64(overlayDisk)/n/(1<<20), "overlayfs-disk-MiB")
	b.ReportMetric(float64(nixDisk)/n/(1<<20), "nix-disk-MiB")
	// Layers are streamed, never held: memory stays flat whatever the size.
	b.ReportMetric(float64(cliPeak)/(1<<20), "cli-peak-MiB")
	b.ReportMetric(float64(daemonPeak)/(1<<20), "daemon-peak-MiB")
}

// removeImages deletes ref's records and collects their content and
// snapshots at once, so the next pull starts cold.
func (e *env) removeImages(tb testing.TB, ref string) {
	tb.Helper()
	out, err := e.ctd.Ctr(tb.Context(), "--namespace", "default", "images", "rm", "--sync", ref, ref+":latest").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "not found") {
		tb.Fatalf("images rm: %v\n%s", err, out)
	}
}

// BenchmarkWarmProvision pulls nix.local/shell/big again from a pinned
// source (the daemon's image cache answers, no Nix runs) on the nix
// snapshotter: into the namespace that has it (goal 50 ms), into a new
// namespace (goal 200 ms), and into a containerd with an empty content
// store (goal 200 ms); and with overlayfs into the namespace that has it
// and into a new namespace (goal 200 ms: its snapshots are linked anew);
// and, from an unpinned source that is a clean git work tree (its commit
// pins it: no Nix runs), into the namespace that has it (goal 50 ms).
// Each figure is the CLI's wall time, process start included.
func BenchmarkWarmProvision(b *testing.B) {
	mib := benchMiB(b)
	// A second tag names the same package set, so that the overlayfs image
	// is one of its own.
	e := newNixEnv(b, withPkgs(bigPackages(b, mib)), func(e *env) {
		e.extraNix = map[string]any{"pinned": true, "revisions": []string{"latest", "overlay"}}
	})
	const ref = "nix.local/shell/big"
	e.mustPull("--snapshotter", "nix", ref)
	e.mustPull("--snapshotter", "overlayfs", ref+":overlay")

	timed := func(args ...string) time.Duration {
		start := time.Now()
		e.mustPull(args...)
		return time.Since(start)
	}
	// A package set that is a clean git work tree, configured unpinned:
	// its commit pins it.
	tree := copyPkgs(b)
	for _, args := range [][]string{{"init", "-q"}, {"add", "."}, {"commit", "-q", "-m", "package set"}} {
		testutil.Git(b, tree, args...)
	}
	worktree := newNixEnv(b, withPkgs(tree))
	worktree.mustPull("--snapshotter", "nix", "nix.local/shell/htop")
	var same, ns, empty, overlay, overlayNS, fixed time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		worktree.mustPull("--snapshotter", "nix", "nix.local/shell/htop")
		fixed += time.Since(start)
		same += timed("--snapshotter", "nix", ref)
		ns += timed("--snapshotter", "nix", "--namespace", fmt.Sprintf("warm%d", i), ref)
		overlay += timed("--snapshotter", "overlayfs", ref+":overlay")
		overlayNS += timed("--snapshotter", "overlayfs", "--namespace", fmt.Sprintf("warm-overlay%d", i), ref+":overlay")

		b.StopTimer()
		fresh := testutil.StartContainerd(b, testutil.WithConfig(fmt.Sprintf("[proxy_plugins.nix]\n  type = \"snapshot\"\n  address = %q", e.daemon.address)))
		b.StartTimer()
		empty += timed("--snapshotter", "nix", "--address", fresh.Address, ref)
	}
	n := float64(b.N)
	b.ReportMetric(float64(same.Milliseconds())/n, "same-namespace-ms")
	b.ReportMetric(float64(ns.Milliseconds())/n, "new-namespace-ms")
	b.ReportMetric(float64(empty.Milliseconds())/n, "empty-content-store-ms")
	b.ReportMetric(float64(overlay.Milliseconds())/n, "overlayfs-same-namespace-ms")
	b.ReportMetric(float64(overlayNS.Milliseconds())/n, "overlayfs-new-namespace-ms")
	b.ReportMetric(float64(fixed.Milliseconds())/n, "git-worktree-ms")
}

// reuseRefs are 20 different images of the test package set.
var reuseRefs = []string{
	"nix.local/htop", "nix.local/git", "nix.local/jq", "nix.local/nano", "nix.local/shell",
	"nix.local/git/htop", "nix.local/jq/nano", "nix.local/shell/htop", "nix.local/shell/git", "nix.local/shell/jq",
	"nix.local/moreutils", "nix.local/coreutils/git", "nix.local/htop/nano", "nix.local/1password", "nix.local/haskellpackages.hello",
	"nix.local/pause", "nix.local/git/jq/htop", "nix.local/shell/nano/git", "nix.local/coreutils/jq", "nix.local/bash/htop",
}

// diskBytes sums the sizes of the files below dir that are not hard links
// (what they hold is stored elsewhere already: the Nix store).
func diskBytes(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Nlink == 1 {
				n += info.Size()
			}
		}
		return nil
	})
	return n
}

// BenchmarkReuseSequence provisions 20 different images of the test
// package set one after another, per layering algorithm, and reports bytes
// stored as multiples of the ideal (each store path once): content and
// overlayfs snapshots as `pull` makes them (no layer blobs, layers linked
// to the store), layer blobs as --with-layers adds them, and nix snapshots.
func BenchmarkReuseSequence(b *testing.B) {
	for i := 0; i < b.N; i++ {
		for _, algo := range []string{"nixery", "auto"} {
			e := newNixEnv(b, func(e *env) { e.extraImage = map[string]any{"layering": algo} })
			ideal := map[string]int64{}
			for _, ref := range reuseRefs {
				e.mustPull("--snapshotter", "overlayfs", ref)
				m, _ := e.manifest(b, ref+":latest")
				for _, l := range m.Layers {
					for _, p := range storePaths(l.Annotations) {
						ideal[p] = 0
					}
				}
			}
			var idealBytes int64
			for p := range ideal {
				idealBytes += testutil.HashFiles(b, p)
			}
			content := func(ns string) int64 {
				var n int64
				e.ctd.Client.ContentStore().Walk(namespaces.WithNamespace(e.ctx(), ns), func(info content.Info) error {
					n += info.Size
					return nil
				})
				return n
			}
			stored := content("default")
			overlay := diskBytes(filepath.Join(e.ctd.Dir, "root", "io.containerd.snapshotter.v1.overlayfs", "snapshots"))
			for _, ref := range reuseRefs {
				e.mustPull("--snapshotter", "overlayfs", "--namespace", "blobs", "--with-layers", ref)
			}
			blobs := content("blobs")
			for _, ref := range reuseRefs {
				e.mustPull("--snapshotter", "nix", "--namespace", "nix", ref)
			}
			nixSnapshots := diskBytes(filepath.Join(e.daemon.root, "overlayfs", "snapshots"))
			b.ReportMetric(float64(stored+overlay)/float64(idealBytes), algo+"-overlayfs/ideal")
			b.ReportMetric(float64(blobs)/float64(idealBytes), algo+"-blobs/ideal")
			b.ReportMetric(float64(nixSnapshots)/float64(idealBytes), algo+"-nix/ideal")
		}
	}
}

// BenchmarkManyLayers pulls nix.local/shell/git, an image of a layer per
// store path of its closure, cold (a fresh containerd and daemon each
// iteration: no snapshot, blob or cache record) into overlayfs and into
// the nix snapshotter, against the Nix prepare step alone (evaluating the
// same packages and querying their closure, in this process) in the same
// iterations, and reports each pull as a multiple of it and what each
// layer costs beyond it; and, as the floor of that cost, what containerd
// itself takes to prepare and commit as many empty snapshots, each on the
// last, through its API (its metadata writes, synced, and round trips),
// and what the disk takes to make a directory (newInodes).
func BenchmarkManyLayers(b *testing.B) {
	const ref = "nix.local/shell/git"
	img, err := resolver.Parse(ref)
	if err != nil {
		b.Fatal(err)
	}
	src, err := nixbuild.PathSource(testutil.TestPkgs())
	if err != nil {
		b.Fatal(err)
	}
	nix := nixbuild.New(src, nixbuild.WithOptions(testutil.NixOptions()))
	defer nix.Close()
	log.SetLevel("warn") // what it says it does goes between the results
	defer log.SetLevel("info")
	prepare := func() {
		res, err := nix.Build(b.Context(), nixbuild.Request{Packages: img.Packages, System: img.Platform.NixSystem})
		if err != nil {
			b.Fatal(err)
		}
		res.Release()
	}
	prepare() // built once, before anything is timed
	var prepareT, overlayT, nixT, floorT, inodeT time.Duration
	const inodes = 64
	layers := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		e := newNixEnv(b)
		b.StartTimer()
		start := time.Now()
		prepare()
		prepareT += time.Since(start)
		start = time.Now()
		e.mustPull("--snapshotter", "overlayfs", ref)
		overlayT += time.Since(start)
		start = time.Now()
		e.mustPull("--snapshotter", "nix", "--namespace", "nix", ref)
		nixT += time.Since(start)
		b.StopTimer()
		m, _ := e.manifest(b, ref+":latest")
		layers = len(m.Layers)
		floorT += emptyChain(b, e, "overlayfs", layers)
		inodeT += newInodes(b, e.ctd.Dir, inodes)
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(float64(layers), "layers")
	b.ReportMetric(prepareT.Seconds()/n, "nix-prepare-s")
	b.ReportMetric(overlayT.Seconds()/n, "overlayfs-s")
	b.ReportMetric(nixT.Seconds()/n, "nix-s")
	b.ReportMetric(float64(overlayT)/float64(prepareT), "overlayfs/prepare")
	b.ReportMetric(float64(nixT)/float64(prepareT), "nix/prepare")
	b.ReportMetric(float64((overlayT-prepareT).Milliseconds())/n/float64(layers), "overlayfs-ms/layer")
	b.ReportMetric(float64((nixT-prepareT).Milliseconds())/n/float64(layers), "nix-ms/layer")
	b.ReportMetric(float64(floorT.Milliseconds())/n/float64(layers), "containerd-floor-ms/layer")
	b.ReportMetric(float64(inodeT.Microseconds())/1000/n/inodes, "mkdir-ms")
}

// newInodes is how long this machine's disk takes to make n empty
// directories, one after another, in dir (removed after): what every
// directory and symlink of a layer costs (the symlink layer is mostly
// symlinks; a linked store path's files cost no inode, its directories
// do), and containerd for each snapshot it prepares.
func newInodes(b *testing.B, dir string, n int) time.Duration {
	dir, err := os.MkdirTemp(dir, "inodes-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	start := time.Now()
	for i := range n {
		if err := os.Mkdir(filepath.Join(dir, strconv.Itoa(i)), 0o755); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start)
}

// emptyChain is how long containerd takes to prepare and commit n empty
// snapshots in snapshotter, each on the one before, as an unpacker does
// for the layers of an image, under a lease, in a namespace of their own
// (of the iteration's containerd), left to its collector after.
func emptyChain(b *testing.B, e *env, snapshotter string, n int) time.Duration {
	ctx := namespaces.WithNamespace(b.Context(), "floor")
	ctx, done, err := e.ctd.Client.WithLease(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer done(context.WithoutCancel(ctx))
	sn := e.ctd.Client.SnapshotService(snapshotter)
	start := time.Now()
	parent := ""
	for i := range n {
		name := fmt.Sprintf("floor-%d", i)
		if _, err := sn.Prepare(ctx, name+"-active", parent); err != nil {
			b.Fatal(err)
		}
		if err := sn.Commit(ctx, name, name+"-active"); err != nil {
			b.Fatal(err)
		}
		parent = name
	}
	return time.Since(start)
}

// BenchmarkEndpointPull pulls nix.local/shell/git into overlayfs through
// the distribution endpoint with ctr (as CRI would: the endpoint unpacks
// its layers into the namespace first, [registry] unpack_into) and with
// `pull`, each cold (a fresh containerd and daemon) and again warm, side
// by side in each iteration, and counts the layer blobs that crossed the
// endpoint (goal: none).
func BenchmarkEndpointPull(b *testing.B) {
	const ref = "nix.local/shell/git:latest"
	var ctrCold, ctrWarm, pullCold, pullWarm time.Duration
	layerBlobs := 0
	timed := func(f func()) time.Duration {
		start := time.Now()
		f()
		return time.Since(start)
	}
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		viaEndpoint := newNixEnv(b, func(e *env) { e.daemon.unpackInto = []string{"default"} })
		direct := newNixEnv(b)
		b.StartTimer()
		ctrCold += timed(func() { viaEndpoint.ctrPull("overlayfs", ref) })
		pullCold += timed(func() { direct.mustPull("--snapshotter", "overlayfs", ref) })
		ctrWarm += timed(func() { viaEndpoint.ctrPull("overlayfs", ref) })
		pullWarm += timed(func() { direct.mustPull("--snapshotter", "overlayfs", ref) })
		b.StopTimer()
		m, _ := viaEndpoint.manifest(b, ref)
		for _, l := range m.Layers {
			layerBlobs += viaEndpoint.requests("/blobs/" + l.Digest.String())
		}
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(ctrCold.Seconds()/n, "ctr-cold-s")
	b.ReportMetric(pullCold.Seconds()/n, "pull-cold-s")
	b.ReportMetric(float64(ctrCold)/float64(pullCold), "ctr/pull-cold")
	b.ReportMetric(float64(ctrWarm.Milliseconds())/n, "ctr-warm-ms")
	b.ReportMetric(float64(pullWarm.Milliseconds())/n, "pull-warm-ms")
	b.ReportMetric(float64(ctrWarm)/float64(pullWarm), "ctr/pull-warm")
	b.ReportMetric(float64(layerBlobs)/n, "layer-blobs")
}

// BenchmarkLoad drives the daemon with a mix of requests — manifest and
// config fetches over the endpoint, as CRI and ctr make them, and CLI pulls
// — over 20 references of a pinned package set at concurrency 16, and
// reports latency percentiles, errors (must be none), Nix evaluations (at
// most one per reference) and the daemon's peak memory.
// NIXERY_LOAD_REQUESTS sets the number of requests (200).
func BenchmarkLoad(b *testing.B) {
	requests := 200
	if v := os.Getenv("NIXERY_LOAD_REQUESTS"); v != "" {
		requests, _ = strconv.Atoi(v)
	}
	bin, calls := countingNix(b)
	// A pinned package set, as a production node has: each image is built
	// once, then answered from the cache.
	e := newNixEnv(b, func(e *env) {
		e.daemon.nixBin = bin
		e.extraNix = map[string]any{"pinned": true}
	})
	base := "http://" + e.daemon.http
	const concurrency = 16
	for i := 0; i < b.N; i++ {
		latencies := make([]time.Duration, requests)
		errs := make([]error, requests)
		work := make(chan int)
		var wg sync.WaitGroup
		for w := 0; w < concurrency; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range work {
					ref := reuseRefs[j%len(reuseRefs)]
					start := time.Now()
					if j%5 == 4 {
						// One in five from the CLI, into its own namespace.
						_, stderr, err := e.pull("--namespace", fmt.Sprintf("load%d", j%3), ref)
						if err != nil {
							errs[j] = fmt.Errorf("%v: %s", err, stderr)
						}
					} else {
						errs[j] = fetchImage(base, strings.TrimPrefix(ref, "nix.local/"))
					}
					latencies[j] = time.Since(start)
				}
			}()
		}
		for j := 0; j < requests; j++ {
			work <- j
		}
		close(work)
		wg.Wait()
		failed := 0
		for j, err := range errs {
			if err != nil {
				failed++
				b.Errorf("request %d (%s): %v", j, reuseRefs[j%len(reuseRefs)], err)
			}
		}
		slices.Sort(latencies)
		b.ReportMetric(float64(latencies[len(latencies)/2].Milliseconds()), "p50-ms")
		b.ReportMetric(float64(latencies[len(latencies)*99/100].Milliseconds()), "p99-ms")
		b.ReportMetric(float64(failed), "errors")
		b.ReportMetric(float64(evaluations(b, calls)), "nix-evaluations")
		b.ReportMetric(float64(e.daemon.peakRSS())/(1<<20), "daemon-peak-MiB")
	}
}

// fetchImage gets an image's manifest by tag and its config by digest.
func fetchImage(base, name string) error {
	resp, err := http.Get(base + "/v2/" + name + "/manifests/latest")
	if err != nil {
		return err
	}
	var m ocispec.Manifest
	err = json.NewDecoder(resp.Body).Decode(&m)
	resp.Body.Close()
	if resp.StatusCode != 200 || err != nil {
		return fmt.Errorf("manifest: %s %v", resp.Status, err)
	}
	resp, err = http.Get(base + "/v2/" + name + "/blobs/" + m.Config.Digest.String())
	if err != nil {
		return err
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || n != m.Config.Size {
		return fmt.Errorf("config: %s, %d bytes", resp.Status, n)
	}
	return nil
}
