package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// mountNSEnv names, in the process InMountNamespace starts, the test it
// runs there.
const mountNSEnv = "NIXERY_TEST_MOUNT_NAMESPACE"

// InMountNamespace lets test t mount what it likes: it reports true when t
// runs in a private mount namespace of its own, where the test goes on.
// Otherwise it runs t again in a new process in such a namespace (this test
// binary under `unshare --mount`), fails t if that run fails, and reports
// false: the caller returns. Mounts made there vanish with the process.
func InMountNamespace(t *testing.T) bool {
	t.Helper()
	if os.Getenv(mountNSEnv) == t.Name() {
		return true
	}
	RequireRoot(t)
	RequireCommands(t, "unshare")
	var run []string
	for _, part := range strings.Split(t.Name(), "/") {
		run = append(run, "^"+regexp.QuoteMeta(part)+"$")
	}
	cmd := exec.CommandContext(t.Context(), "unshare", "--mount", "--propagation", "private",
		os.Args[0], "-test.run", strings.Join(run, "/"), "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), mountNSEnv+"="+t.Name())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	t.Logf("in a private mount namespace:\n%s", out.String())
	if err != nil {
		t.Fatalf("%s in a private mount namespace: %v", t.Name(), err)
	}
	if !strings.Contains(out.String(), "--- PASS: "+t.Name()) {
		t.Fatalf("%s did not pass in the private mount namespace (skipped?)", t.Name())
	}
	return false
}
