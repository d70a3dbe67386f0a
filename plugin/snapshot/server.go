package snapshot

import (
	"context"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/listen"
)

// Serve serves sn as containerd's snapshots gRPC API on the unix
// socket at address until ctx ends, then stops gracefully. It tells systemd
// (Type=notify) when it is ready: the socket accepts connections from
// then on.
func Serve(ctx context.Context, sn snapshots.Snapshotter, address string) error {
	l, err := listen.Unix(address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("notifying systemd")
	}
	go func() {
		<-ctx.Done()
		_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
		log.G(ctx).Info("stopping")
	}()
	return listen.ServeGRPC(ctx, "the nix snapshotter", srv, l)
}
