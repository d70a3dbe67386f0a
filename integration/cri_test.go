package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestCRI stands in for kubelet: through containerd's CRI it pulls
// nix.local/shell/htop with nothing provisioned beforehand, runs a
// host-network pod (its sandbox image nix.local/pause served by the
// endpoint too) with a container running htop, reads its log, and cleans
// up; with CRI on the nix snapshotter, and on overlayfs, where the
// endpoint unpacks an image's layers into CRI's snapshots before it
// answers (the default [registry] unpack_into): on neither does a layer
// blob cross the endpoint.
func TestCRI(t *testing.T) {
	for _, snapshotter := range []string{"nix", "overlayfs"} {
		t.Run(snapshotter, func(t *testing.T) { testCRI(t, snapshotter) })
	}
}

func testCRI(t *testing.T, snapshotter string) {
	// The node's package set is pinned, as an operator's is: a repeated
	// pull is answered from the cache, without Nix.
	bin, calls := countingNix(t)
	e := newNixEnv(t, withCRI(), func(e *env) {
		e.daemon.nixBin = bin
		e.extraNix = map[string]any{"pinned": true}
		e.criSnapshotter = snapshotter
	})
	conn, err := grpc.NewClient("unix://"+e.ctd.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	images := runtime.NewImageServiceClient(conn)
	rt := runtime.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	// Pre-provisioning on a node: `pull --namespace k8s.io` registers what
	// CRI looks up, pinned, and returns once CRI sees it.
	e.mustPull("--namespace", "k8s.io", "--snapshotter", snapshotter, "nix.local/git")
	cliBlobs := e.requests("/blobs/")
	st, err := images.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: &runtime.ImageSpec{Image: "nix.local/git"}})
	if err != nil || st.Image == nil {
		t.Fatalf("ImageStatus after pull --namespace k8s.io: %v %v", st, err)
	}
	if !st.Image.Pinned || len(st.Image.RepoDigests) == 0 || !containsPrefix(st.Image.RepoTags, "nix.local/git:latest") {
		t.Errorf("pre-provisioned image: pinned %v, tags %v, digests %v", st.Image.Pinned, st.Image.RepoTags, st.Image.RepoDigests)
	}

	const image = "nix.local/shell/htop"
	start := time.Now()
	pulled, err := images.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: image}})
	if err != nil {
		t.Fatalf("PullImage: %v\ndaemon log:\n%s", err, e.daemon.log())
	}
	cold := time.Since(start)
	status, err := images.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: &runtime.ImageSpec{Image: image}})
	if err != nil || status.Image == nil {
		t.Fatalf("ImageStatus: %v %v", status, err)
	}
	if !containsPrefix(status.Image.RepoTags, "nix.local/shell/htop:latest") {
		t.Errorf("repo tags %v", status.Image.RepoTags)
	}

	logDir := t.TempDir()
	podConfig := &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: "htop", Namespace: "default", Uid: "uid-htop"},
		LogDirectory: logDir,
		Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{
			NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE},
		}},
	}
	pod, err := rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v\ndaemon log:\n%s", err, e.daemon.log())
	}
	defer func() {
		rt.StopPodSandbox(context.WithoutCancel(ctx), &runtime.StopPodSandboxRequest{PodSandboxId: pod.PodSandboxId})
		rt.RemovePodSandbox(context.WithoutCancel(ctx), &runtime.RemovePodSandboxRequest{PodSandboxId: pod.PodSandboxId})
	}()
	created, err := rt.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: pod.PodSandboxId,
		Config: &runtime.ContainerConfig{
			Metadata: &runtime.ContainerMetadata{Name: "htop"},
			Image:    &runtime.ImageSpec{Image: pulled.ImageRef},
			Command:  []string{"htop", "--version"},
			LogPath:  "htop.log",
		},
		SandboxConfig: podConfig,
	})
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	if _, err := rt.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: created.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	for {
		st, err := rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: created.ContainerId})
		if err != nil {
			t.Fatal(err)
		}
		if st.Status.State == runtime.ContainerState_CONTAINER_EXITED {
			if st.Status.ExitCode != 0 {
				t.Errorf("exit code %d: %s", st.Status.ExitCode, st.Status.Message)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatal("container did not exit")
		}
		time.Sleep(100 * time.Millisecond)
	}
	logs, err := os.ReadFile(filepath.Join(logDir, "htop.log"))
	if err != nil || !strings.Contains(string(logs), " stdout F "+htopVersion()) {
		t.Errorf("container log %q, %v", logs, err)
	}
	if _, err := rt.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: created.ContainerId}); err != nil {
		t.Error(err)
	}
	if _, err := rt.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: created.ContainerId}); err != nil {
		t.Error(err)
	}

	// kubelet's policy Always for :latest pulls again: the endpoint answers
	// the manifest, and nothing else moves.
	blobs := e.requests("/blobs/")
	evals := evaluations(t, calls)
	start = time.Now()
	again, err := images.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: image}})
	if err != nil {
		t.Fatal(err)
	}
	warm := time.Since(start)
	if again.ImageRef != pulled.ImageRef {
		t.Errorf("second pull %s, first %s", again.ImageRef, pulled.ImageRef)
	}
	if n := e.requests("/blobs/") - blobs; n != 0 {
		t.Errorf("second pull fetched %d blobs", n)
	}
	if n := evaluations(t, calls) - evals; n != 0 {
		t.Errorf("second pull ran %d Nix evaluations", n)
	}
	t.Logf("CRI pull: cold %s, again %s", cold.Round(time.Millisecond), warm.Round(time.Millisecond))

	// No layer blob ever crossed the endpoint for CRI: only the configs of
	// htop and pause.
	if n := e.requests("/blobs/") - cliBlobs; n != 2 {
		t.Errorf("%d blob requests from CRI, want 2 (two image configs):\n%s", n, e.daemon.log())
	}
}

func containsPrefix(list []string, prefix string) bool {
	for _, s := range list {
		if strings.HasPrefix(s, prefix) {
			return true
		}
	}
	return false
}
