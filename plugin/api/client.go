package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/privdir"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

// ErrUntrusted says a socket someone other than root could have made:
// what answers there may not be the daemon.
var ErrUntrusted = errors.New("not the daemon's socket")

// ErrNoDaemon says no daemon listens on the socket.
var ErrNoDaemon = errors.New("no daemon answers")

// Client calls a daemon's API.
type Client struct {
	socket string
	conn   *grpc.ClientConn
}

// Dial returns a client of the daemon on the unix socket at socket, after
// checking that only root could have made it. It fails with ErrNoDaemon
// when nothing is there, ErrUntrusted when the socket is not root's.
func Dial(socket string) (*Client, error) {
	if _, err := os.Stat(socket); err != nil {
		return nil, fmt.Errorf("%w on %s: %w", ErrNoDaemon, socket, err)
	}
	trusted := func() error {
		if err := privdir.Check(socket); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrUntrusted, socket, err)
		}
		return nil
	}
	if err := trusted(); err != nil {
		return nil, err
	}
	// Checked again whenever gRPC dials (again): the socket may be
	// replaced while the daemon restarts.
	dial := func(ctx context.Context, _ string) (net.Conn, error) {
		if err := trusted(); err != nil {
			return nil, err
		}
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}
	conn, err := grpc.NewClient("passthrough:///nixery-daemon",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dial),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(codec{})))
	if err != nil {
		return nil, fmt.Errorf("the daemon's API on %s: %w", socket, err)
	}
	return &Client{socket: socket, conn: conn}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Info asks what the daemon builds. A daemon that does not answer is
// ErrNoDaemon.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var info Info
	err := c.conn.Invoke(ctx, "/"+serviceName+"/Info", &InfoRequest{}, &info)
	if err != nil {
		err = errgrpc.ToNative(err)
		if errdefs.IsUnavailable(err) {
			err = fmt.Errorf("%w on %s: %w", ErrNoDaemon, c.socket, err)
		}
		return Info{}, err
	}
	return info, nil
}

// Build has the daemon build and register req's image, sending its
// progress to the progress sink of ctx as it comes. Errors keep the kind
// the daemon gave them.
func (c *Client) Build(ctx context.Context, req BuildRequest) (BuildResult, error) {
	stream, err := c.conn.NewStream(ctx, &serviceDesc.Streams[0], "/"+serviceName+"/Build")
	if err != nil {
		return BuildResult{}, errgrpc.ToNative(err)
	}
	if err := stream.SendMsg(&req); err != nil {
		return BuildResult{}, errgrpc.ToNative(err)
	}
	if err := stream.CloseSend(); err != nil {
		return BuildResult{}, errgrpc.ToNative(err)
	}
	for {
		var e BuildEvent
		err := stream.RecvMsg(&e)
		switch {
		case errors.Is(err, io.EOF):
			return BuildResult{}, fmt.Errorf("the daemon ended the build of %s without a result: %w", req.Ref, errdefs.ErrUnknown)
		case err != nil:
			err = errgrpc.ToNative(err)
			if errdefs.IsUnavailable(err) && ctx.Err() == nil {
				err = fmt.Errorf("the daemon on %s stopped answering while it built %s: %w", c.socket, req.Ref, err)
			}
			return BuildResult{}, err
		case e.Result != nil:
			return *e.Result, nil
		case e.Progress != nil:
			progress.Send(ctx, *e.Progress)
		}
	}
}
