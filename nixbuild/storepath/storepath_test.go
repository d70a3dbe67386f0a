package storepath

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestCheck(t *testing.T) {
	const hash = "4bjipwxsbcl40y4ch110jflfmzl2rvsr"
	for _, ok := range []string{
		"/nix/store/" + hash + "-htop-3.2.2",
		"/nix/store/" + hash + "-python3.11-pip-23.1+git=x?y_z",
		"/nix/store/" + hash + "-.dotfile",
		"/nix/store/" + hash + "-" + strings.Repeat("n", 211),
	} {
		if err := Check(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{
		"",
		"/etc/shadow",
		"/nix/store",
		"/nix/store/",
		"/nix/store/" + hash,
		"/nix/store/" + hash + "-",
		"/nix/store/" + hash + "-htop/bin/htop",
		"/nix/store/" + hash + "-htop/../../../etc/shadow",
		"/nix/store/../../etc/shadow",
		"/nix/store/" + hash + "-..",
		"/nix/store/" + hash + "-.",
		"/nix/store/" + hash + "-..-x",
		"/nix/store/" + strings.Replace(hash, "4", "e", 1) + "-htop", // e is not base-32
		"/nix/store/" + strings.ToUpper(hash) + "-htop",
		"/nix/store/" + hash + "-ht op",
		"/nix/store/" + hash + "-htop\n/etc/shadow",
		"/nix/store/" + hash + "-htop\x00",
		"/nix/store/" + hash + "-" + strings.Repeat("n", 212),
		"--option",
		"--option plugin-files /proc/self/cwd/../tmp/x/evil.so",
		"-/nix/store/" + hash + "-htop",
		"nix/store/" + hash + "-htop",
		"//nix/store/" + hash + "-htop",
		"/nix/store//" + hash + "-htop",
		"/nix/store/./" + hash + "-htop",
	} {
		err := Check(bad)
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: %v", bad, err)
		}
	}
	err := CheckAll([]string{"/nix/store/" + hash + "-ok", "/etc/shadow", "--option"})
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "/etc/shadow") || !strings.Contains(err.Error(), "--option") {
		t.Errorf("CheckAll: %v", err)
	}
	if err := CheckAll([]string{"/nix/store/" + hash + "-ok"}); err != nil {
		t.Errorf("CheckAll: %v", err)
	}
}

func FuzzCheck(f *testing.F) {
	f.Add("/nix/store/4bjipwxsbcl40y4ch110jflfmzl2rvsr-htop-3.2.2")
	f.Add("/nix/store/../etc")
	f.Fuzz(func(t *testing.T, p string) {
		if Check(p) != nil {
			return
		}
		// Whatever passes is one component below the store.
		rest := strings.TrimPrefix(p, DefaultDir+"/")
		if strings.ContainsAny(rest, "/\x00\n ") || rest == ".." || strings.HasPrefix(p, "-") {
			t.Errorf("%q passed", p)
		}
	})
}
