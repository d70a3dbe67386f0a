package plugin

import (
	"context"
	"fmt"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/procdir"
	"github.com/nixery-snapshotter/nixery-snapshotter/internal/snapmount"
)

// ownerLabel names, on a lease, the process that works under it (a
// procdir lock file): a lease whose process is gone is deleted by the next
// pull, with what only it held (content, snapshots being unpacked).
// containerd cannot extend a lease, so its expiry is only a backstop, for
// a node where no pull ever runs again.
const ownerLabel = "nixery-snapshotter/owner"

// leaseBackstop is how much longer than the Nix timeout a lease lives.
const leaseBackstop = time.Hour

// createLease makes the lease of one provisioning, owned by this process
// (its directory below workDir), after cleaning up after processes that
// died: their leases (with what only they held) and their temporary
// mounts. Without a work directory the lease has no owner: only its
// expiry ends it.
func createLease(ctx context.Context, client *containerd.Client, workDir string, expiry time.Duration) (leases.Lease, error) {
	opts := []leases.Opt{leases.WithRandomID(), leases.WithExpiration(expiry)}
	if workDir != "" {
		own, err := procdir.Open(workDir, nil)
		if err != nil {
			return leases.Lease{}, err
		}
		sweepLeases(ctx, client)
		snapmount.SweepTempMounts(workDir)
		opts = append(opts, leases.WithLabel(ownerLabel, own.Owner()))
	}
	return client.LeasesService().Create(ctx, opts...)
}

// sweepLeases deletes, in every namespace, the leases of this project's
// processes that are gone, and with them (synchronously: a disk it filled
// is free again) whatever only they held.
func sweepLeases(ctx context.Context, client *containerd.Client) {
	nss, err := client.NamespaceService().List(ctx)
	if err != nil {
		log.G(ctx).WithError(err).Warn("listing namespaces to sweep leases")
		return
	}
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		ls, err := client.LeasesService().List(nctx, fmt.Sprintf("labels.%q", ownerLabel))
		if err != nil {
			continue
		}
		for _, l := range ls {
			if procdir.Alive(l.Labels[ownerLabel]) {
				continue
			}
			log.G(ctx).WithFields(log.Fields{"lease": l.ID, "namespace": ns}).Info("deleting the lease of a pull that did not finish")
			if err := client.LeasesService().Delete(nctx, l, leases.SynchronousDelete); err != nil {
				log.G(ctx).WithError(err).Warn("deleting a stale lease")
			}
		}
	}
}
