package tarstream

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestParseUser(t *testing.T) {
	for in, want := range map[string]User{
		"":                  {},
		"root":              {},
		"0:0":               {},
		"alice":             {Name: "alice", UID: 1000, GID: 1000},
		"1001:100":          {Name: "user", UID: 1001, GID: 100},
		"svc:500:0":         {Name: "svc", UID: 500, GID: 0},
		"_x-1:4294967294:1": {Name: "_x-1", UID: 4294967294, GID: 1},
	} {
		got, err := ParseUser(in)
		if err != nil || got != want {
			t.Errorf("ParseUser(%q) = %+v, %v; want %+v", in, got, err, want)
			continue
		}
		// String is read back as the same user: it is the label's form.
		if back, err := ParseUser(got.String()); err != nil || back != got {
			t.Errorf("ParseUser(%q) = %+v, %v; want %+v", got.String(), back, err, got)
		}
	}
	for _, in := range []string{
		"Alice", "a b", "a:1", "1:2:3", "alice:x:1", "alice:1:-1", "alice:01:1", "alice:4294967295:1",
		"a:1:2:3", "root:1:1", "alice:0:0", "0:1", "nobody", "bob:65534:1", "bob:1:65534", "1000:1000\n",
		"../etc", "a/b", strings.Repeat("a", 33),
	} {
		if u, err := ParseUser(in); !errdefs.IsInvalidArgument(err) {
			t.Errorf("ParseUser(%q) = %+v, %v; want an invalid argument", in, u, err)
		}
	}
}

func TestSymlinkForestUser(t *testing.T) {
	root := t.TempDir()
	makeStore(t, root, 0o644, time.Now())
	// Packages with an /etc of their own: its entries stay, but not its
	// passwd; one whose /etc is a symlink is unfolded.
	cacert := "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-cacert"
	shadow := "/nix/store/ffffffffffffffffffffffffffffffff-shadow"
	for name, content := range map[string]string{
		cacert + "/etc/ssl/certs/ca-bundle.crt": "certs",
		cacert + "/etc/passwd":                  "mallory:x:0:0::/:/bin/sh\n",
		shadow + "/share/etc/login.defs":        "defs",
	} {
		os.MkdirAll(filepath.Join(root, filepath.Dir(name)), 0o755)
		os.WriteFile(filepath.Join(root, name), []byte(content), 0o444)
	}
	os.Symlink("share/etc", filepath.Join(root, shadow, "etc"))

	u := User{Name: "alice", UID: 1001, GID: 100}
	var buf bytes.Buffer
	if err := WriteSymlinkForest(&buf, []string{cacert, core}, WithRoot(root), WithUser(u)); err != nil {
		t.Fatal(err)
	}
	_, entries := readTar(t, buf.Bytes())
	for name, want := range map[string]entry{
		"etc/passwd": {typ: tar.TypeReg, mode: 0o644, content: "root:x:0:0:root:/root:/bin/sh\n" +
			"alice:x:1001:100::/home/alice:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n"},
		"etc/group":   {typ: tar.TypeReg, mode: 0o644, content: "root:x:0:\nalice:x:100:\nnogroup:x:65534:\n"},
		"etc/ssl/":    {typ: tar.TypeSymlink, mode: 0o777, target: cacert + "/etc/ssl"},
		"home/":       {typ: tar.TypeDir, mode: 0o755},
		"home/alice/": {typ: tar.TypeDir, mode: 0o755, owner: "1001:100"},
		"root/":       {typ: tar.TypeDir, mode: 0o700},
		"tmp/":        {typ: tar.TypeDir, mode: 0o1777},
		"bin/ls":      {typ: tar.TypeSymlink, mode: 0o777, target: core + "/bin/ls"},
	} {
		name := strings.TrimSuffix(name, "/")
		if want.typ == tar.TypeDir {
			name += "/"
		}
		if got, ok := entries[name]; !ok || got != want {
			t.Errorf("%s: got %+v (present %v), want %+v", name, got, ok, want)
		}
	}

	buf.Reset()
	if err := WriteSymlinkForest(&buf, []string{shadow, core}, WithRoot(root), WithUser(u)); err != nil {
		t.Fatal(err)
	}
	_, entries = readTar(t, buf.Bytes())
	for _, name := range []string{"etc/passwd", "etc/group", "home/alice/"} {
		if _, ok := entries[name]; !ok {
			t.Errorf("no %s where a package's /etc is a symlink", name)
		}
	}
	if e := entries["etc/login.defs"]; e.typ != tar.TypeSymlink || e.target != shadow+"/share/etc/login.defs" {
		t.Errorf("etc/login.defs of the unfolded /etc is %+v", e)
	}

	// An /etc that leads out of the store is not unfolded: the host's
	// files never reach an image.
	for i, out := range []string{"/etc", "../../../../etc", "share/up"} {
		leaky := fmt.Sprintf("/nix/store/%032d-leaky", i)
		os.MkdirAll(filepath.Join(root, leaky, "share"), 0o755)
		os.Symlink("../../../../..", filepath.Join(root, leaky, "share", "up"))
		os.Symlink(out, filepath.Join(root, leaky, "etc"))
		buf.Reset()
		if err := WriteSymlinkForest(&buf, []string{leaky}, WithRoot(root), WithUser(u)); err != nil {
			t.Fatal(err)
		}
		names, _ := readTar(t, buf.Bytes())
		for _, name := range names {
			if strings.HasPrefix(name, "etc/") && name != "etc/" && name != "etc/passwd" && name != "etc/group" {
				t.Errorf("/etc -> %s: the forest has %s", out, name)
			}
		}
	}

	// Root's forest has none of it.
	var plain bytes.Buffer
	if err := WriteSymlinkForest(&plain, []string{cacert, shadow, core}, WithRoot(root)); err != nil {
		t.Fatal(err)
	}
	_, entries = readTar(t, plain.Bytes())
	if e := entries["etc/passwd"]; e.typ != tar.TypeSymlink || e.target != cacert+"/etc/passwd" {
		t.Errorf("root's etc/passwd is %+v, want the package's", e)
	}
	for _, name := range []string{"home/", "root/"} {
		if _, ok := entries[name]; ok {
			t.Errorf("root's forest has %s", name)
		}
	}
}
