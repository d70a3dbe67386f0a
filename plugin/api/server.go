package api

import (
	"context"
	"fmt"
	"sync"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/listen"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

// Serve serves d on the unix socket at address (root's alone) until ctx
// ends, then stops, letting builds under way end for listen.StopGrace.
func Serve(ctx context.Context, d Daemon, address string) error {
	l, err := listen.Unix(address)
	if err != nil {
		return fmt.Errorf("the daemon's API: %w", err)
	}
	srv := grpc.NewServer(grpc.ForceServerCodec(codec{}),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			resp, err := handler(ctx, req)
			return resp, errgrpc.ToGRPC(err)
		}))
	srv.RegisterService(&serviceDesc, d)
	return listen.ServeGRPC(ctx, "the daemon's API", srv, l)
}

// serveBuild runs one Build, streaming its progress as it comes and its
// result last.
func serveBuild(stream grpc.ServerStream, d Daemon, req BuildRequest) error {
	ctx := stream.Context()
	var mu sync.Mutex // one message at a time on a stream
	send := func(e BuildEvent) error {
		mu.Lock()
		defer mu.Unlock()
		return stream.SendMsg(&e)
	}
	sink := progress.SinkFunc(func(e progress.Event) {
		if err := send(BuildEvent{Progress: &e}); err != nil {
			log.G(ctx).WithError(err).Debug("progress not sent: the client left")
		}
	})
	res, err := d.Build(progress.WithSink(ctx, sink), req)
	if err != nil {
		return errgrpc.ToGRPC(err)
	}
	return send(BuildEvent{Result: &res})
}
