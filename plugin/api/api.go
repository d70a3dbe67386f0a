// Package api is the daemon's API for the CLI, on the daemon's unix
// socket: what the daemon builds (Info), and builds with live progress
// (Build). api.proto is its written specification; this package speaks it
// with gRPC's JSON encoding, so that no generated code is needed, and
// carries errors as containerd's errdefs kinds (errgrpc) across it.
package api

import (
	"context"
	"encoding/json"
	"fmt"

	"google.golang.org/grpc"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

// InfoRequest asks for Info.
type InfoRequest struct{}

// Info says what a daemon builds.
type Info struct {
	Version       string `json:"version"`
	PackageSource string `json:"packageSource"`
	Host          string `json:"host"`
	// User is whom its images run as (tarstream.User's Key), "" for root.
	User string `json:"user,omitempty"`
	// Platforms are the platforms of its image indexes, comma-separated
	// ([image] platforms); "" for images of the node's platform alone.
	Platforms string `json:"platforms,omitempty"`
}

// Differs says how a daemon that answers i builds other images than one
// that would answer want, or "" if it builds the same (versions aside).
func (i Info) Differs(want Info) string {
	switch {
	case i.PackageSource != want.PackageSource:
		return fmt.Sprintf("it builds from %s, not %s", i.PackageSource, want.PackageSource)
	case i.Host != want.Host:
		return fmt.Sprintf("its image host is %s, not %s", i.Host, want.Host)
	case i.User != want.User:
		return fmt.Sprintf("its images run as %s, not %s", orRoot(i.User), orRoot(want.User))
	case i.Platforms != want.Platforms:
		return fmt.Sprintf("its images are for platforms %q, not %q", i.Platforms, want.Platforms)
	}
	return ""
}

func orRoot(user string) string {
	if user == "" {
		return "root"
	}
	return user
}

// BuildRequest asks the daemon to build and register an image.
type BuildRequest struct {
	Ref         string `json:"ref"`
	Namespace   string `json:"namespace"`
	Snapshotter string `json:"snapshotter,omitempty"`
	WithLayers  bool   `json:"withLayers,omitempty"`
	// Containerd is the socket of the containerd to register in; "" is
	// the daemon's own.
	Containerd string `json:"containerd,omitempty"`
}

// BuildEvent is one message of a Build stream: progress, or the result,
// which comes last.
type BuildEvent struct {
	Progress *progress.Event `json:"progress,omitempty"`
	Result   *BuildResult    `json:"result,omitempty"`
}

// BuildResult is the image registered.
type BuildResult struct {
	Name   string `json:"name"`
	Digest string `json:"digest"`
}

// Daemon is what the daemon serves. Build sends its progress to the
// progress sink of its context, which the server streams to the client.
type Daemon interface {
	Info(ctx context.Context) (Info, error)
	Build(ctx context.Context, req BuildRequest) (BuildResult, error)
}

const serviceName = "nixery.api.v1.Daemon"

// serviceDesc is what protoc would generate from api.proto.
var serviceDesc = grpc.ServiceDesc{
	ServiceName: serviceName,
	HandlerType: (*Daemon)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Info",
		Handler: func(srv any, ctx context.Context, dec func(any) error, intercept grpc.UnaryServerInterceptor) (any, error) {
			var req InfoRequest
			if err := dec(&req); err != nil {
				return nil, err
			}
			call := func(ctx context.Context, _ any) (any, error) {
				info, err := srv.(Daemon).Info(ctx)
				return &info, err
			}
			if intercept == nil {
				return call(ctx, &req)
			}
			return intercept(ctx, &req, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + serviceName + "/Info"}, call)
		},
	}},
	Streams: []grpc.StreamDesc{{
		StreamName:    "Build",
		ServerStreams: true,
		Handler: func(srv any, stream grpc.ServerStream) error {
			var req BuildRequest
			if err := stream.RecvMsg(&req); err != nil {
				return err
			}
			return serveBuild(stream, srv.(Daemon), req)
		},
	}},
	Metadata: "plugin/api/api.proto",
}

// codec is gRPC's JSON encoding of the API's messages.
type codec struct{}

func (codec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (codec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (codec) Name() string                       { return "json" }
