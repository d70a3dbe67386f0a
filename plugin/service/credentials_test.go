package service

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// Credentials come from docker's config.json as `docker login` writes
// them, for the host asked; none where it has none or there is no file.
func TestDockerCredentials(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("DOCKER_CONFIG", dir)
	creds := dockerCredentials(context.Background())
	if u, p, err := creds("registry.example.org"); u != "" || p != "" || err != nil {
		t.Errorf("without a config: %q %q %v", u, p, err)
	}
	cfg := `{"auths": {
		"registry.example.org": {"auth": "YWxpY2U6czNjcjN0Og=="},
		"https://other.example.org": {"username": "bob", "password": "pw"},
		"token.example.org": {"identitytoken": "refresh"},
		"https://pathed.example.org/v1/": {"username": "carol", "password": "pw2"},
		"bad.example.org": {"auth": "not base64"}
	}, "credHelpers": {"helped.example.org": "ecr-login"}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string][2]string{
		"registry.example.org": {"alice", "s3cr3t:"},
		"other.example.org":    {"bob", "pw"},
		"token.example.org":    {"", "refresh"},
		"pathed.example.org":   {"carol", "pw2"},
		"helped.example.org":   {"", ""},
		"unknown.example.org":  {"", ""},
	} {
		if u, p, err := creds(host); u != want[0] || p != want[1] || err != nil {
			t.Errorf("%s: %q %q %v, want %q", host, u, p, err, want)
		}
	}
	if _, _, err := creds("bad.example.org"); err == nil {
		t.Error("an auth that is not base64 of user:password was taken")
	}
}
