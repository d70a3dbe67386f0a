// Package resolver gives image references their meaning: which Nix packages
// an image holds and for which platform. It is pure: no Nix, no I/O.
package resolver

import (
	"fmt"
	"runtime"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
)

// DefaultHost is the registry host under which references name Nix packages.
const DefaultHost = "nix.local"

// DefaultTag is the tag of a reference that names none.
const DefaultTag = "latest"

// maxPackages bounds how many packages one reference may name. The reference
// grammar already caps a name at 255 characters; this keeps error messages
// and Nix argument lists readable when that is filled with one-letter names.
const maxPackages = 64

// alwaysIncluded are added to every image, as Nixery does: TLS roots and
// /etc/services & co. are what most programs expect to find.
var alwaysIncluded = []string{"cacert", "iana-etc"}

// shellPackages is what the `shell` meta-package expands to.
var shellPackages = []string{"bashInteractive", "coreutils", "moreutils", "nano"}

// Platform is a Nix system and the OCI platform of images built for it.
type Platform struct {
	NixSystem    string // e.g. "x86_64-linux"
	Architecture string // OCI architecture, e.g. "amd64"
	OS           string // always "linux"
}

var (
	amd64 = Platform{NixSystem: "x86_64-linux", Architecture: "amd64", OS: "linux"}
	arm64 = Platform{NixSystem: "aarch64-linux", Architecture: "arm64", OS: "linux"}
)

// ParsePlatform reads an OCI platform ("linux/amd64", "linux/arm64",
// "linux/arm64/v8") as one Nix builds for.
func ParsePlatform(s string) (Platform, error) {
	switch strings.TrimSuffix(s, "/v8") {
	case "linux/amd64":
		return amd64, nil
	case "linux/arm64":
		return arm64, nil
	}
	return Platform{}, fmt.Errorf("platform %q: images are built for linux/amd64 (x86_64-linux) and linux/arm64 (aarch64-linux): %w", s, errdefs.ErrInvalidArgument)
}

// String is p as an OCI platform, os/architecture.
func (p Platform) String() string { return p.OS + "/" + p.Architecture }

// JoinPlatforms is ps as a list: "linux/amd64,linux/arm64".
func JoinPlatforms(ps []Platform) string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return strings.Join(out, ",")
}

// Image is what a reference asks for.
type Image struct {
	// Name is the reference's repository as written, e.g. "nix.local/shell/htop".
	Name string
	// Tag selects the package source revision; DefaultTag when none was given.
	Tag string
	// Packages are the attribute paths to realise: meta-packages expanded,
	// always-included packages added, sorted and without duplicates.
	Packages []string
	// Requested are the packages the reference names itself, sorted: no
	// meta-packages, nothing added.
	Requested []string
	Platform  Platform
	// PlatformNamed says the reference chose its platform (the arm64
	// meta-package), rather than taking the default.
	PlatformNamed bool
}

// Ref is the image's fully qualified name, as image records are named.
func (i Image) Ref() string { return i.Name + ":" + i.Tag }

type parseOptions struct {
	host     string
	platform Platform
}

// Opt adjusts Parse.
type Opt func(*parseOptions)

// WithHost sets the registry host that references must name.
func WithHost(host string) Opt { return func(o *parseOptions) { o.host = host } }

// WithDefaultPlatform sets the platform of references without the `arm64`
// meta-package. By default it is the host's (amd64 or arm64).
func WithDefaultPlatform(p Platform) Opt { return func(o *parseOptions) { o.platform = p } }

// HostPlatform is the platform images are built for unless a reference says otherwise.
func HostPlatform() Platform {
	if runtime.GOARCH == "arm64" {
		return arm64
	}
	return amd64
}

// Parse reads a reference such as "nix.local/shell/htop:latest". Every
// error is an errdefs.ErrInvalidArgument that names the problem; a reference
// that parses holds only names the registry grammar allows, which cannot be
// read as Nix code.
func Parse(ref string, opts ...Opt) (Image, error) {
	o := parseOptions{host: DefaultHost, platform: HostPlatform()}
	for _, opt := range opts {
		opt(&o)
	}
	invalid := func(format string, args ...any) (Image, error) {
		return Image{}, fmt.Errorf("invalid reference %q: %s: %w", ref, fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument)
	}

	if ref == "" {
		return invalid("empty")
	}
	if !strings.HasPrefix(ref, o.host+"/") {
		return invalid("must start with %s/ followed by package names", o.host)
	}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return invalid("%v", err)
	}
	if reference.Domain(named) != o.host {
		return invalid("must start with %s/ followed by package names", o.host)
	}
	if _, ok := named.(reference.Digested); ok {
		return invalid("digest references name content, not packages; use a tag")
	}
	tag := DefaultTag
	if tagged, ok := named.(reference.Tagged); ok {
		tag = tagged.Tag()
	}

	segments := strings.Split(reference.Path(named), "/")
	if len(segments) > maxPackages {
		return invalid("%d package names, at most %d allowed", len(segments), maxPackages)
	}

	platform, platformNamed := o.platform, false
	var pkgs, requested []string
	meta := true
	for _, seg := range segments {
		// Meta-packages count only at the front, as in Nixery: `htop/shell`
		// asks for a package called shell.
		if meta {
			switch seg {
			case "shell":
				pkgs = append(pkgs, shellPackages...)
				continue
			case "arm64":
				platform, platformNamed = arm64, true
				continue
			}
			meta = false
		}
		pkgs = append(pkgs, seg)
		requested = append(requested, seg)
	}
	slices.Sort(requested)
	requested = slices.Compact(requested)
	pkgs = append(pkgs, alwaysIncluded...)
	slices.Sort(pkgs)
	pkgs = slices.Compact(pkgs)

	return Image{
		Name:          named.Name(),
		Tag:           tag,
		Packages:      pkgs,
		Requested:     requested,
		Platform:      platform,
		PlatformNamed: platformNamed,
	}, nil
}
