package plugin

import (
	"context"
	"fmt"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/listen"
)

// ServeSnapshotter serves sn as containerd's snapshots gRPC API on the unix
// socket at address until ctx ends, then stops gracefully. It tells systemd
// (Type=notify) when it is ready.
func ServeSnapshotter(ctx context.Context, sn snapshots.Snapshotter, address string) error {
	l, err := listen.Unix(address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	log.G(ctx).WithField("address", address).Info("serving the nix snapshotter")
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("notifying systemd")
	}

	select {
	case err := <-served:
		return fmt.Errorf("serving %s: %w", address, err)
	case <-ctx.Done():
	}
	_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
	log.G(ctx).Info("stopping")
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(listen.StopGrace):
		srv.Stop()
	}
	return nil
}
