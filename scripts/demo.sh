#!/usr/bin/env bash
# scripts/demo.sh - fresh machine to a working csi-nfs-fuse mount in one go:
# installs deps, builds the release binary, starts a loopback NFSv3 server
# (nfs-ganesha via scripts/ganesha.sh), mounts it with csi-nfs-fuse (no kernel
# NFS client involved), writes a file through the mount, reads it back, checks
# it reached the server's disk, then unmounts.
#
# Environment: CSI_NFS_FUSE_DEMO_MNT (default /tmp/csi-nfs-fuse-demo),
#              CSI_NFS_FUSE_DEMO_OPTS (mount -o options, default "rw"),
#              CSI_NFS_FUSE_BIN (default target/release/csi-nfs-fuse),
#              KEEP_MOUNTED=1 to leave the mount and the server running.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

MNT=${CSI_NFS_FUSE_DEMO_MNT:-/tmp/csi-nfs-fuse-demo}
OPTS=${CSI_NFS_FUSE_DEMO_OPTS:-rw}
BIN=${CSI_NFS_FUSE_BIN:-$REPO_ROOT/target/release/csi-nfs-fuse}
MOUNT_PID=""
STARTED_GANESHA=no
say() { echo "demo: $*" >&2; }

unmount() {
    if mountpoint -q "$MNT"; then
        fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    if [[ -n $MOUNT_PID ]]; then
        local i
        for ((i = 0; i < 50; i++)); do kill -0 "$MOUNT_PID" 2>/dev/null || break; sleep 0.1; done
        kill "$MOUNT_PID" 2>/dev/null || true
        wait "$MOUNT_PID" 2>/dev/null || true
        MOUNT_PID=""
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT
    if [[ ${KEEP_MOUNTED:-0} != 1 || $rc != 0 ]]; then
        unmount
        [[ $STARTED_GANESHA == yes ]] && "$GANESHA_SH" stop >/dev/null 2>&1
    fi
    ((rc == 0)) && say "OK" || say "FAILED (exit code $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "installing dependencies (if missing)"
ensure_deps

say "building (cargo build --release)"
cargo build --release

"$GANESHA_SH" status --name default >/dev/null 2>&1 || STARTED_GANESHA=yes
eval "$("$GANESHA_SH" start)"
URL="nfs://$host$export_path"
say "NFS server ready: $URL (ganesha pid $pid, log $log)"

mkdir -p "$MNT"
if mountpoint -q "$MNT"; then
    say "$MNT is already a mountpoint; unmounting it first"
    fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT"
fi

say "mounting $URL on $MNT"
"$BIN" mount "$URL" "$MNT" -o "$OPTS" --foreground &
MOUNT_PID=$!
for ((i = 0; i < 100; i++)); do
    mountpoint -q "$MNT" && break
    kill -0 "$MOUNT_PID" 2>/dev/null || { wait "$MOUNT_PID" || true; MOUNT_PID=""; say "csi-nfs-fuse mount exited early"; exit 1; }
    sleep 0.1
done
mountpoint -q "$MNT" || { say "$MNT did not become a mountpoint within 10 s"; exit 1; }
grep -E " $MNT fuse" /proc/mounts >&2 || true

FILE=demo-$$.txt
MSG="hello from csi-nfs-fuse at $(date -u +%FT%TZ)"
say "writing $MNT/$FILE"
echo "$MSG" >"$MNT/$FILE"
sync "$MNT/$FILE" 2>/dev/null || sync
GOT=$(cat "$MNT/$FILE")
[[ $GOT == "$MSG" ]] || { say "read back mismatch: '$GOT'"; exit 1; }
say "read back through the mount: $GOT"
[[ $(cat "$export_dir/$FILE") == "$MSG" ]] || { say "file did not reach the server's export dir $export_dir"; exit 1; }
say "and it is on the NFS server's disk: $export_dir/$FILE"
ls -l "$MNT" >&2
rm -f "$MNT/$FILE"

if [[ ${KEEP_MOUNTED:-0} == 1 ]]; then
    say "KEEP_MOUNTED=1: leaving $MNT mounted (pid $MOUNT_PID) and ganesha running"
    MOUNT_PID=""
else
    say "unmounting $MNT"
    unmount
fi
