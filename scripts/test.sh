#!/usr/bin/env bash
# scripts/test.sh - the whole test suite (CI runs exactly this via .ci/run).
#
# Installs what is missing, starts the default loopback ganesha NFSv3 server
# (scripts/ganesha.sh) and runs `cargo test --workspace` against it.
# Extra arguments go to cargo test, e.g.: scripts/test.sh -- --nocapture
#
# Environment given to the tests:
#   CSI_NFS_FUSE_GANESHA_HOST        127.0.0.1
#   CSI_NFS_FUSE_GANESHA_EXPORT      export path clients mount (nfs://HOST<EXPORT>)
#   CSI_NFS_FUSE_GANESHA_DIR         the same directory on local disk
#   CSI_NFS_FUSE_GANESHA_NFS_PORT    2049   (also registered with rpcbind)
#   CSI_NFS_FUSE_GANESHA_MOUNT_PORT  20048
#   CSI_NFS_FUSE_GANESHA_SCRIPT      path of scripts/ganesha.sh, for tests that
#                                    kill/restart the server or start named ones
#   CSI_NFS_FUSE_REQUIRE_GANESHA     1: ganesha tests fail instead of skipping
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

START=$SECONDS
STARTED_GANESHA=no
ganesha_log=""

finish() {
    local rc=$?
    trap - EXIT
    if ((rc != 0)) && [[ -n $ganesha_log && -f $ganesha_log ]]; then
        echo "---- last lines of $ganesha_log ----" >&2
        tail -n 15 "$ganesha_log" >&2 || true
    fi
    if [[ $STARTED_GANESHA == yes ]]; then
        # also stops named instances a failing test may have left behind
        "$GANESHA_SH" stop --all >/dev/null 2>&1 || true
    fi
    if ((rc == 0)) && [[ -n ${export_dir:-} && -d $export_dir ]]; then
        # Each test works in its own t-NAME-PID directory; a passing run
        # leaves none behind (a failing one keeps them to look at).
        rm -rf "$export_dir"/t-* 2>/dev/null || true
    fi
    if ((rc == 0)); then
        echo "test.sh: PASS (all tests passed in $((SECONDS - START))s)"
    else
        echo "test.sh: FAIL (exit code $rc after $((SECONDS - START))s)" >&2
    fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

ensure_deps

if ! "$GANESHA_SH" status --name default >/dev/null 2>&1; then
    STARTED_GANESHA=yes
fi
ganesha_env=$("$GANESHA_SH" start)
eval "$ganesha_env"
ganesha_log=$log

export CSI_NFS_FUSE_GANESHA_HOST=$host
export CSI_NFS_FUSE_GANESHA_EXPORT=$export_path
export CSI_NFS_FUSE_GANESHA_DIR=$export_dir
export CSI_NFS_FUSE_GANESHA_NFS_PORT=$nfs_port
export CSI_NFS_FUSE_GANESHA_MOUNT_PORT=$mount_port
export CSI_NFS_FUSE_GANESHA_SCRIPT=$GANESHA_SH
export CSI_NFS_FUSE_REQUIRE_GANESHA=1 # tests must fail, not skip, without the server
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
echo "test.sh: ganesha ready: nfs://$host$export_path (nfs port $nfs_port, mount port $mount_port, pid $pid)" >&2

cargo test --workspace "$@"
