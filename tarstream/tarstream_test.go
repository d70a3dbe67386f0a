package tarstream

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/testutil"
)

const (
	htop  = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-htop-3.2.2"
	glibc = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-glibc-2.36"
	core  = "/nix/store/cccccccccccccccccccccccccccccccc-coreutils-9.1"
)

var longName = strings.Repeat("long-directory-name/", 8) + "file-with-a-name-past-100-bytes.txt"

// makeStore writes a small store below root. perm and mtime vary between
// calls to show that neither reaches the tar.
func makeStore(t *testing.T, root string, perm os.FileMode, mtime time.Time) {
	t.Helper()
	files := map[string]string{
		htop + "/bin/htop":               "#!htop binary",
		htop + "/share/man/man1/htop.1":  "man page",
		htop + "/share/" + longName:      "long",
		htop + "/share/ünïcödé-名前.txt":   "unicode",
		htop + "/nix-support/propagated": "",
		glibc + "/lib/libc.so.6":         "libc",
		glibc + "/lib/libm.so.6":         "libm",
		core + "/bin/env":                "env",
		core + "/bin/ls":                 "ls",
		core + "/share/man/man1/ls.1":    "ls man page",
	}
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), perm); err != nil {
			t.Fatal(err)
		}
	}
	for _, exe := range []string{htop + "/bin/htop", core + "/bin/env", core + "/bin/ls"} {
		if err := os.Chmod(filepath.Join(root, exe), perm|0o111); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("libc.so.6", filepath.Join(root, glibc, "lib/libc.so")); err != nil {
		t.Fatal(err)
	}
	// A hard link, as `nix-store --optimise` makes them.
	if err := os.Link(filepath.Join(root, glibc, "lib/libm.so.6"), filepath.Join(root, glibc, "lib/libm-copy.so.6")); err != nil {
		t.Fatal(err)
	}
	filepath.Walk(root, func(p string, _ os.FileInfo, _ error) error {
		os.Chtimes(p, mtime, mtime)
		return nil
	})
}

type entry struct {
	typ     byte
	mode    int64
	target  string
	content string
	// owner is "uid:gid", which only an image user's home may have other
	// than 0:0.
	owner string
}

func readTar(t *testing.T, b []byte) ([]string, map[string]entry) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(b))
	var names []string
	entries := map[string]entry{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names, entries
		}
		if err != nil {
			t.Fatal(err)
		}
		owner := ""
		if h.Uid != 0 || h.Gid != 0 {
			owner = fmt.Sprintf("%d:%d", h.Uid, h.Gid)
		}
		if (owner != "" && !strings.HasPrefix(h.Name, "home/")) || h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: owner %d:%d %q:%q", h.Name, h.Uid, h.Gid, h.Uname, h.Gname)
		}
		if !h.ModTime.Equal(Epoch) || !h.AccessTime.IsZero() || !h.ChangeTime.IsZero() {
			t.Errorf("%s: times %v %v %v", h.Name, h.ModTime, h.AccessTime, h.ChangeTime)
		}
		if _, dup := entries[h.Name]; dup {
			t.Errorf("%s written twice", h.Name)
		}
		content, _ := io.ReadAll(tr)
		names = append(names, h.Name)
		entries[h.Name] = entry{h.Typeflag, h.Mode, h.Linkname, string(content), owner}
	}
}

func storeLayer(t *testing.T, root string, paths ...string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteStorePaths(&buf, paths, WithRoot(root)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestWriteStorePaths(t *testing.T) {
	root := t.TempDir()
	makeStore(t, root, 0o644, time.Now())
	names, entries := readTar(t, storeLayer(t, root, glibc, htop))

	if names[0] != "nix/" || names[1] != "nix/store/" {
		t.Errorf("layer starts with %v, want the parent directories", names[:2])
	}
	for name, want := range map[string]entry{
		"nix/":                        {typ: tar.TypeDir, mode: 0o755},
		"nix/store/":                  {typ: tar.TypeDir, mode: 0o755},
		entryName(htop) + "/":         {typ: tar.TypeDir, mode: 0o555},
		entryName(htop) + "/bin/htop": {typ: tar.TypeReg, mode: 0o555, content: "#!htop binary"},
		entryName(htop) + "/share/man/man1/htop.1": {typ: tar.TypeReg, mode: 0o444, content: "man page"},
		entryName(htop) + "/share/" + longName:     {typ: tar.TypeReg, mode: 0o444, content: "long"},
		entryName(htop) + "/share/ünïcödé-名前.txt":  {typ: tar.TypeReg, mode: 0o444, content: "unicode"},
		entryName(glibc) + "/lib/libc.so":          {typ: tar.TypeSymlink, mode: 0o777, target: "libc.so.6"},
		entryName(glibc) + "/lib/libm.so.6":        {typ: tar.TypeReg, mode: 0o444, content: "libm"},
		entryName(glibc) + "/lib/libm-copy.so.6":   {typ: tar.TypeReg, mode: 0o444, content: "libm"},
	} {
		if got, ok := entries[name]; !ok || got != want {
			t.Errorf("%s: got %+v (present %v), want %+v", name, got, ok, want)
		}
	}
	// Paths come in the order given; each directory's entries in name order.
	if i, j := indexOf(names, entryName(glibc)+"/"), indexOf(names, entryName(htop)+"/"); i > j {
		t.Errorf("glibc at %d after htop at %d", i, j)
	}
	if i, j := indexOf(names, entryName(htop)+"/bin/"), indexOf(names, entryName(htop)+"/share/"); i > j {
		t.Errorf("bin/ at %d after share/ at %d", i, j)
	}
}

func indexOf(names []string, name string) int {
	for i, n := range names {
		if n == name {
			return i
		}
	}
	return -1
}

// The same store gives the same bytes whatever the files' local metadata.
func TestWriteStorePathsReproducible(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	makeStore(t, a, 0o644, time.Now())
	makeStore(t, b, 0o600, time.Unix(12345, 0))
	if err := os.Chown(filepath.Join(b, htop, "bin/htop"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	la, lb := storeLayer(t, a, glibc, htop), storeLayer(t, b, glibc, htop)
	if !bytes.Equal(la, lb) {
		t.Error("layers of the same store paths differ")
	}
	if !bytes.Equal(la, storeLayer(t, a, glibc, htop)) {
		t.Error("two runs differ")
	}
}

func TestWriteStorePathsRejects(t *testing.T) {
	root := t.TempDir()
	makeStore(t, root, 0o644, time.Now())
	if err := syscall.Mkfifo(filepath.Join(root, htop, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		want func(error) bool
	}{
		{"nix/store/relative", errdefs.IsInvalidArgument},
		{"/nix/store/../../etc", errdefs.IsInvalidArgument},
		{htop, errdefs.IsInvalidArgument}, // holds a fifo
		{"/nix/store/dddddddddddddddddddddddddddddddd-missing", func(err error) bool { return errors.Is(err, os.ErrNotExist) }},
	} {
		err := WriteStorePaths(io.Discard, []string{tc.path}, WithRoot(root))
		if err == nil || !tc.want(err) {
			t.Errorf("%s: %v", tc.path, err)
		}
	}
}

// Store files named like whiteouts cannot be in any layer: refused, named,
// on the tar path and in the symlink forest alike.
func TestWhiteoutNames(t *testing.T) {
	root := t.TempDir()
	makeStore(t, root, 0o644, time.Now())
	wh := filepath.Join(root, core, "share", ".wh.secret")
	if err := os.WriteFile(wh, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	err := WriteStorePaths(io.Discard, []string{core}, WithRoot(root))
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), ".wh.secret") || !strings.Contains(err.Error(), "whiteout") {
		t.Errorf("store path with a .wh. file: %v", err)
	}
	if err := WriteSymlinkForest(io.Discard, []string{core}, WithRoot(root)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), ".wh.secret") {
		t.Errorf("forest of a package with a .wh. file: %v", err)
	}
	if err := Check("/nix/store/x/.wh..wh..opq", 0); err == nil {
		t.Error("opaque whiteout name accepted")
	}
	if err := Check("/nix/store/x/a.wh.b", 0); err != nil {
		t.Errorf("a name with .wh. inside: %v", err)
	}
}

// A range of a layer is exactly that part of the whole layer, and the
// files before it are not read.
func TestSkip(t *testing.T) {
	root := t.TempDir()
	makeStore(t, root, 0o644, time.Now())
	big := filepath.Join(root, htop, "share", "big")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(big, data, 0o444); err != nil {
		t.Fatal(err)
	}
	full := storeLayer(t, root, glibc, htop)
	for _, off := range []int64{0, 1, 511, 512, 513, 1500, int64(len(full)) / 2, int64(len(full)) - 1025, int64(len(full)) - 1, int64(len(full))} {
		var b bytes.Buffer
		if err := WriteStorePaths(&b, []string{glibc, htop}, WithRoot(root), Skip(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b.Bytes(), full[off:]) {
			t.Errorf("skip %d: %d bytes, not the layer's last %d", off, b.Len(), int64(len(full))-off)
		}
	}
	// Past the big file, it is not opened at all.
	var opened []string
	openFile = func(name string) (*os.File, error) {
		opened = append(opened, name)
		return os.Open(name)
	}
	defer func() { openFile = os.Open }()
	var b bytes.Buffer
	err := WriteStorePaths(&b, []string{glibc, htop}, WithRoot(root), Skip(int64(len(full))-1024))
	if err != nil || !bytes.Equal(b.Bytes(), full[len(full)-1024:]) {
		t.Errorf("skipping to the end: %v (%d bytes)", err, b.Len())
	}
	if len(opened) != 0 {
		t.Errorf("files opened for a range after them: %v", opened)
	}
}

func TestWriteSymlinkForest(t *testing.T) {
	root := t.TempDir()
	makeStore(t, root, 0o644, time.Now())
	// A second package with bin/htop: the first in order wins.
	other := "/nix/store/dddddddddddddddddddddddddddddddd-other"
	os.MkdirAll(filepath.Join(root, other, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, other, "bin/htop"), nil, 0o755)
	os.WriteFile(filepath.Join(root, other, "bin/other"), nil, 0o755)

	var buf bytes.Buffer
	if err := WriteSymlinkForest(&buf, []string{core, htop, other}, WithRoot(root)); err != nil {
		t.Fatal(err)
	}
	_, entries := readTar(t, buf.Bytes())
	for name, want := range map[string]entry{
		"bin/":                  {typ: tar.TypeDir, mode: 0o755},
		"bin/htop":              {typ: tar.TypeSymlink, mode: 0o777, target: htop + "/bin/htop"},
		"bin/other":             {typ: tar.TypeSymlink, mode: 0o777, target: other + "/bin/other"},
		"bin/ls":                {typ: tar.TypeSymlink, mode: 0o777, target: core + "/bin/ls"},
		"share/man/man1/ls.1":   {typ: tar.TypeSymlink, mode: 0o777, target: core + "/share/man/man1/ls.1"},
		"share/man/man1/htop.1": {typ: tar.TypeSymlink, mode: 0o777, target: htop + "/share/man/man1/htop.1"},
		"usr/bin/env":           {typ: tar.TypeSymlink, mode: 0o777, target: core + "/bin/env"},
		"tmp/":                  {typ: tar.TypeDir, mode: 0o1777},
	} {
		if got, ok := entries[name]; !ok || got != want {
			t.Errorf("%s: got %+v (present %v), want %+v", name, got, ok, want)
		}
	}
	if _, ok := entries["nix-support/"]; ok {
		t.Error("nix-support reached the forest")
	}

	// Without a bin/env there is no /usr/bin/env, but still a /tmp.
	buf.Reset()
	if err := WriteSymlinkForest(&buf, []string{glibc}, WithRoot(root)); err != nil {
		t.Fatal(err)
	}
	_, entries = readTar(t, buf.Bytes())
	if _, ok := entries["usr/bin/env"]; ok {
		t.Error("usr/bin/env without coreutils")
	}
	// Top-level directories stay directories even with one package.
	if e := entries["lib/"]; e.typ != tar.TypeDir {
		t.Errorf("lib/ is %+v", e)
	}
	if e := entries["lib/libc.so.6"]; e.typ != tar.TypeSymlink || e.target != glibc+"/lib/libc.so.6" {
		t.Errorf("lib/libc.so.6 is %+v", e)
	}
	if _, ok := entries["tmp/"]; !ok {
		t.Error("no tmp/")
	}
}

func TestMeasure(t *testing.T) {
	var buf bytes.Buffer
	m := Measure(&buf)
	io.WriteString(m, "hello ")
	io.WriteString(m, "world")
	if m.Size() != 11 || m.Digest().String() != "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9" || buf.String() != "hello world" {
		t.Errorf("size %d digest %s", m.Size(), m.Digest())
	}
}

// benchStore writes a store of mib MiB: files from 4 KiB to 1 MiB, as
// real closures mix them, and returns its root and store path.
func benchStore(b *testing.B, mib int) (string, string) {
	root := b.TempDir()
	dir := filepath.Join(root, htop)
	os.MkdirAll(dir, 0o755)
	r := rand.New(rand.NewPCG(1, 2))
	remaining := mib << 20
	for i := 0; remaining > 0; i++ {
		size := min(remaining, 4096<<r.IntN(9))
		buf := make([]byte, size)
		for j := range buf {
			buf[j] = byte(r.Uint32())
		}
		sub := filepath.Join(dir, fmt.Sprintf("d%d", i%16))
		os.MkdirAll(sub, 0o755)
		os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%d", i)), buf, 0o644)
		remaining -= size
	}
	return root, htop
}

// BenchmarkPackingVsHash packs a store path into a tar layer and digests it
// (what describing a layer costs) and, side by side in each iteration,
// reads the same files once through sha256: packing/limit is how close
// packing comes to that limit (goal: at least 0.9).
func BenchmarkPackingVsHash(b *testing.B) {
	root, path := benchStore(b, 256)
	size := testutil.HashFiles(b, filepath.Join(root, path)) // warms the page cache too
	var packT, hashT time.Duration
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		m := Measure(io.Discard)
		if err := WriteStorePaths(m, []string{path}, WithRoot(root)); err != nil {
			b.Fatal(err)
		}
		_ = m.Digest()
		packT += time.Since(start)
		start = time.Now()
		testutil.HashFiles(b, filepath.Join(root, path))
		hashT += time.Since(start)
	}
	b.ReportMetric(float64(hashT)/float64(packT), "packing/limit")
}

func BenchmarkWriteStorePaths(b *testing.B) {
	root := b.TempDir()
	dir := filepath.Join(root, htop)
	os.MkdirAll(dir, 0o755)
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	for i := 0; i < 64; i++ {
		os.WriteFile(filepath.Join(dir, "f"+string(rune('a'+i%26))+string(rune('a'+i/26))), chunk, 0o644)
	}
	b.SetBytes(64 << 20)
	for i := 0; i < b.N; i++ {
		if err := WriteStorePaths(io.Discard, []string{htop}, WithRoot(root)); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzWriteStorePaths writes store paths with arbitrary file names,
// contents and modes, and reads the layer back: every file is there once,
// with its bytes, and the bytes are the same on a second run.
func FuzzWriteStorePaths(f *testing.F) {
	f.Add("bin/htop", []byte("program"), true, "share/ünïcödé", []byte{0, 1, 2})
	f.Add(strings.Repeat("d/", 60)+"f", []byte("deep"), false, "a b", []byte(""))
	f.Fuzz(func(t *testing.T, name1 string, data1 []byte, exec1 bool, name2 string, data2 []byte) {
		clean := func(name string) (string, bool) {
			name = filepath.Clean(name)
			if name == "." || strings.HasPrefix(name, "..") || filepath.IsAbs(name) || strings.ContainsRune(name, 0) || len(name) > 1000 {
				return "", false
			}
			for _, part := range strings.Split(name, "/") {
				if len(part) > 255 {
					return "", false
				}
			}
			return name, true
		}
		n1, ok1 := clean(name1)
		n2, ok2 := clean(name2)
		if !ok1 || !ok2 || n1 == n2 || strings.HasPrefix(n1+"/", n2+"/") || strings.HasPrefix(n2+"/", n1+"/") {
			return
		}
		root := t.TempDir()
		files := map[string][]byte{n1: data1, n2: data2}
		for name, data := range files {
			p := filepath.Join(root, htop, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return
			}
			mode := os.FileMode(0o644)
			if name == n1 && exec1 {
				mode = 0o755
			}
			if err := os.WriteFile(p, data, mode); err != nil {
				return
			}
		}
		var a, b bytes.Buffer
		if err := WriteStorePaths(&a, []string{htop}, WithRoot(root)); err != nil {
			t.Fatal(err)
		}
		if err := WriteStorePaths(&b, []string{htop}, WithRoot(root)); err != nil || !bytes.Equal(a.Bytes(), b.Bytes()) {
			t.Fatal("two runs differ")
		}
		_, entries := readTar(t, a.Bytes())
		for name, data := range files {
			e, ok := entries[entryName(htop)+"/"+filepath.ToSlash(name)]
			if !ok || e.content != string(data) {
				t.Fatalf("%q: got %+v (present %v)", name, e, ok)
			}
		}
	})
}
