package nixbuild

import (
	"context"
)

// Push copies paths and their closure to the Nix store at uri (a binary
// cache: file://, http(s)://, s3://, ssh://; its query says how, e.g.
// secret-key=FILE to sign) with `nix copy`. Paths the destination has
// already are not sent again: Nix asks it first.
func (b *Builder) Push(ctx context.Context, uri string, paths []string) error {
	args := append([]string{"--extra-experimental-features", "nix-command", "copy", "--to", uri, "--"}, paths...)
	_, err := b.run(ctx, "push", "nix", b.args(args...)...)
	return err
}
