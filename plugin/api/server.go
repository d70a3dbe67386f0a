package api

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

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
			if err != nil {
				return nil, statusOf(err)
			}
			return resp, nil
		}))
	srv.RegisterService(&serviceDesc, d)
	return listen.ServeGRPC(ctx, "the daemon's API", srv, l)
}

// progressQueue is how many events wait for a client that reads slowly;
// more are dropped rather than stall the build, which others may share.
const progressQueue = 1024

// serveBuild runs one Build, streaming its progress as it comes and its
// result last.
func serveBuild(stream grpc.ServerStream, d Daemon, req BuildRequest) error {
	ctx := stream.Context()
	sent := progress.NewBuffered(progress.SinkFunc(func(e progress.Event) {
		if err := stream.SendMsg(&BuildEvent{Progress: &e}); err != nil {
			log.G(ctx).WithError(err).Debug("progress not sent: the client left")
		}
	}), progressQueue)
	res, err := d.Build(progress.WithSink(ctx, sent), req)
	if dropped := sent.Close(); dropped > 0 {
		log.G(ctx).WithField("dropped", dropped).Warn("the client read its build's progress too slowly: events were dropped")
	}
	if err != nil {
		return statusOf(err)
	}
	return stream.SendMsg(&BuildEvent{Result: &res})
}

// statusOf is err as a gRPC status: the code of its errdefs kind, its
// message, and nothing else (the message is for a person, the code for
// the client's errgrpc.ToNative).
func statusOf(err error) error {
	return status.New(status.Code(errgrpc.ToGRPC(err)), err.Error()).Err()
}
