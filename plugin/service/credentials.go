package service

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/log"
)

// dockerConfig is what docker's config.json says of registry credentials.
type dockerConfig struct {
	Auths map[string]struct {
		Auth     string `json:"auth"`
		Username string `json:"username"`
		Password string `json:"password"`
		// IdentityToken is an OAuth refresh token (docker login to some
		// registries); containerd takes it with an empty user.
		IdentityToken string `json:"identitytoken"`
	} `json:"auths"`
	CredsStore  string            `json:"credsStore"`
	CredHelpers map[string]string `json:"credHelpers"`
}

// dockerConfigFile is docker's config.json: $DOCKER_CONFIG/config.json,
// else ~/.docker/config.json.
func dockerConfigFile() string {
	if dir := os.Getenv("DOCKER_CONFIG"); dir != "" {
		return filepath.Join(dir, "config.json")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".docker", "config.json")
}

// dockerCredentials answers containerd's resolver with the credentials
// docker's config.json holds for a host (as `docker login` writes them).
func dockerCredentials(ctx context.Context) func(host string) (string, string, error) {
	return func(host string) (string, string, error) {
		file := dockerConfigFile()
		b, err := os.ReadFile(file)
		if os.IsNotExist(err) || file == "" {
			return "", "", nil
		}
		if err != nil {
			return "", "", fmt.Errorf("registry credentials: %w", err)
		}
		var cfg dockerConfig
		if err := json.Unmarshal(b, &cfg); err != nil {
			return "", "", fmt.Errorf("registry credentials: %s: %w", file, err)
		}
		return cfg.credentials(ctx, file, host)
	}
}

func (cfg dockerConfig) credentials(ctx context.Context, file, host string) (string, string, error) {
	hosts := []string{host}
	if host == "registry-1.docker.io" {
		hosts = append(hosts, "index.docker.io", "docker.io")
	}
	// As docker matches them: the host, whatever scheme and path the key
	// was written with (https://host/v1/).
	for _, k := range slices.Sorted(maps.Keys(cfg.Auths)) {
		a := cfg.Auths[k]
		keyHost := strings.TrimPrefix(strings.TrimPrefix(k, "https://"), "http://")
		keyHost, _, _ = strings.Cut(keyHost, "/")
		if !slices.Contains(hosts, keyHost) {
			continue
		}
		log.G(ctx).WithField("host", host).WithField("config", file).WithField("key", k).Debug("registry credentials")
		switch {
		case a.IdentityToken != "":
			return "", a.IdentityToken, nil
		case a.Auth != "":
			dec, err := base64.StdEncoding.DecodeString(a.Auth)
			user, secret, found := strings.Cut(string(dec), ":")
			if err != nil || !found {
				return "", "", fmt.Errorf("registry credentials: %s: the auth of %s is not base64 of user:password", file, k)
			}
			return user, secret, nil
		case a.Username != "":
			return a.Username, a.Password, nil
		}
	}
	if helper := cfg.CredHelpers[host]; helper != "" || cfg.CredsStore != "" {
		log.G(ctx).WithField("host", host).WithField("config", file).
			Warn("docker's config names a credential helper, which this command does not run: pushing without credentials (put them in auths, as `docker login` does without a helper)")
	}
	return "", "", nil
}
