package plugin

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/procdir"
)

// ownerLabel names, on a lease, the process that works under it (a
// procdir lock file): a lease whose process is gone is deleted by the next
// pull, with what only it held (content, snapshots being unpacked).
// containerd cannot extend a lease, so its expiry is only a backstop, for
// a node where no pull ever runs again.
const ownerLabel = "nixery-snapshotter/owner"

// leaseBackstop is how much longer than the Nix timeout a lease lives.
const leaseBackstop = time.Hour

// mountsDir holds, below a work directory, the temporary mount points of
// this project's processes, one directory each (procdir).
func mountsDir(workDir string) string { return filepath.Join(workDir, "mounts") }

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
		procdir.Sweep(mountsDir(workDir), unmountBelow)
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

// tempMounts is where containerd's temporary mounts go (a setting of the
// whole process).
var tempMounts struct {
	once sync.Once
	err  error
}

// useTempMounts makes containerd's temporary mounts (unpacking into
// snapshotters that are not plain directories) in this process's own
// directory below workDir, where the next process unmounts them if this
// one dies; without a work directory, containerd's default place.
func useTempMounts(workDir string) error {
	if workDir == "" {
		return nil
	}
	tempMounts.once.Do(func() {
		dir, err := procdir.Open(mountsDir(workDir), unmountBelow)
		if err == nil {
			err = mount.SetTempMountLocation(dir.Path())
		}
		tempMounts.err = err
	})
	return tempMounts.err
}

// unmountBelow unmounts everything mounted below dir, deepest first, then
// removes the empty directories: never a file system that is still
// mounted.
func unmountBelow(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int { return len(b.Mountpoint) - len(a.Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmounting %s: %w", m.Mountpoint, err)
		}
	}
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		} else if err == nil {
			_ = os.Remove(p) // the lock file
		}
		return nil
	})
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	for _, d := range dirs {
		_ = os.Remove(d)
	}
	return nil
}
