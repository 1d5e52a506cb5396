#!/usr/bin/env bash
# scripts/bench-mount.sh - the mount benchmark table: csi-nfs-fuse through
# FUSE, side by side with libnfs (nfs-cp/nfs-cat and a small libnfs random-read
# program) and a local FUSE passthrough ceiling (bindfs over the export dir),
# all against the same loopback ganesha export, in one run.
#
#   scripts/bench-mount.sh [SIZE_MIB] [RUNS]      (defaults 1024 MiB, 3 runs; medians)
#   CSI_NFS_FUSE_BENCH_OPTS=nconnect=2 scripts/bench-mount.sh
#
# Rows: seq write + fsync (dd bs=1M conv=fsync), cold seq read (all caches
# dropped and the mount remounted, so no cache of ours helps), warm re-read,
# 4 KiB random read O_DIRECT with 1 and 4 jobs (fio; the file warm in the
# server's memory, so the row compares clients, not disk seeks), create / ls -l / rm of
# 10,000 empty files, untar of a 5,800-entry 72 MiB tree; then the mount
# process's peak RSS with 4 parallel readers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

SIZE_MIB=${1:-1024}
RUNS=${2:-3}
OPTS=${CSI_NFS_FUSE_BENCH_OPTS:-}
ensure_deps
"$GANESHA_SH" install libnfs-utils libnfs-dev fio bindfs >/dev/null
eval "$("$GANESHA_SH" start)"
cargo build --release --quiet
BIN=$REPO_ROOT/target/release/csi-nfs-fuse
URL=nfs://127.0.0.1$export_path
WORK=$(mktemp -d /tmp/csi-nfs-fuse-bench.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
gcc -O2 -o "$WORK/libnfs-randread" scripts/bench/libnfs-randread.c -lnfs -lpthread

cleanup() {
    mountpoint -q "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    sleep 0.2
    rm -rf "$WORK" "$export_dir"/bench-* 2>/dev/null || true
}
trap cleanup EXIT

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
warm_server() { cat "$1" >/dev/null; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mibs() { awk -v n="$1" -v t="$2" 'BEGIN {printf "%.0f", n / t}'; }

# mount_kind KIND: mounts csi-nfs-fuse or bindfs on $MNT over $export_dir/bench-KIND
mount_kind() {
    mountpoint -q "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; sleep 0.2; }
    mkdir -p "$export_dir/bench-$1"
    case $1 in
        csi-nfs-fuse) "$BIN" mount "$URL/bench-$1" "$MNT" --daemon -o "allow_other${OPTS:+,$OPTS}" ;;
        bindfs) bindfs --no-allow-other "$export_dir/bench-$1" "$MNT" ;;
    esac
}

timed() { local s; s=$(now); "$@" >/dev/null 2>&1; secs "$s" "$(now)"; }

# A deterministic tree: 400 directories, 5,400 files, about 72 MiB.
python3 - "$WORK/tree" <<'PY'
import os, random, sys
root = sys.argv[1]; r = random.Random(7)
for d in range(400):
    os.makedirs(f"{root}/d{d // 20}/s{d}", exist_ok=True)
for f in range(5400):
    size = int(r.expovariate(1 / 13980))
    with open(f"{root}/d{f % 400 // 20}/s{f % 400}/f{f}", "wb") as fh:
        fh.write(r.randbytes(min(size, 2 << 20)))
PY
tar -C "$WORK" -cf "$WORK/tree.tar" tree
TAR_ENTRIES=$(tar -tf "$WORK/tree.tar" | wc -l)
TAR_MIB=$(du -m "$WORK/tree.tar" | cut -f1)
rm -rf "$WORK/tree"

declare -A R
for kind in csi-nfs-fuse bindfs; do
    w=(); cr=(); wr=(); c=(); l=(); d=(); u=()
    for ((i = 0; i < RUNS; i++)); do
        mount_kind "$kind"
        w+=("$(timed dd if=/dev/zero of="$MNT/seq" bs=1M count="$SIZE_MIB" conv=fsync)")
        mount_kind "$kind"; drop
        cr+=("$(timed dd if="$MNT/seq" of=/dev/null bs=1M)")
        wr+=("$(timed dd if="$MNT/seq" of=/dev/null bs=1M)")
        mkdir "$MNT/meta"
        c+=("$(timed bash -c "cd '$MNT/meta' && for i in \$(seq 1 10000); do : > f\$i; done")")
        mount_kind "$kind"
        l+=("$(timed ls -l "$MNT/meta")")
        d+=("$(timed rm -rf "$MNT/meta")")
        u+=("$(timed tar -C "$MNT" -xf "$WORK/tree.tar")")
        rm -rf "$MNT/tree"
    done
    R[$kind.w]=$(mibs "$SIZE_MIB" "$(printf '%s\n' "${w[@]}" | median)")
    R[$kind.cr]=$(mibs "$SIZE_MIB" "$(printf '%s\n' "${cr[@]}" | median)")
    R[$kind.wr]=$(mibs "$SIZE_MIB" "$(printf '%s\n' "${wr[@]}" | median)")
    R[$kind.c]=$(printf '%s\n' "${c[@]}" | median)
    R[$kind.l]=$(printf '%s\n' "${l[@]}" | median)
    R[$kind.d]=$(printf '%s\n' "${d[@]}" | median)
    R[$kind.u]=$(printf '%s\n' "${u[@]}" | median)
    # Random reads measure the client, not the disk: every peer reads a file
    # the server holds in memory (dropped caches would make all of them
    # wait on the same random disk reads). Our own cache is empty: fresh mount.
    mount_kind "$kind"; drop; warm_server "$export_dir/bench-$kind/seq"
    for jobs in 1 4; do
        R[$kind.r$jobs]=$(fio --name=r --filename="$MNT/seq" --rw=randread --bs=4k --direct=1 --numjobs=$jobs \
            --time_based --runtime=10 --ioengine=psync --group_reporting --output-format=terse 2>/dev/null \
            | awk -F';' '{s += $8} END {printf "%.0f", s}')
    done
    if [[ $kind == csi-nfs-fuse ]]; then
        pid=$(pgrep -f "csi-nfs-fuse mount $URL/bench-$kind" | head -n1)
        drop
        for j in 1 2 3 4; do dd if="$MNT/seq" of=/dev/null bs=1M 2>/dev/null & done
        wait
        R[rss]=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    fi
done

# libnfs peers on the same export.
w=(); cr=(); wr=()
dd if=/dev/zero of=/dev/shm/bench-src bs=1M count="$SIZE_MIB" status=none
for ((i = 0; i < RUNS; i++)); do
    rm -f "$export_dir/bench-libnfs"
    w+=("$(timed nfs-cp /dev/shm/bench-src "$URL/bench-libnfs")")
    drop
    cr+=("$(timed nfs-cat "$URL/bench-libnfs")")
    wr+=("$(timed nfs-cat "$URL/bench-libnfs")")
done
rm -f /dev/shm/bench-src
R[libnfs.w]=$(mibs "$SIZE_MIB" "$(printf '%s\n' "${w[@]}" | median)")
R[libnfs.cr]=$(mibs "$SIZE_MIB" "$(printf '%s\n' "${cr[@]}" | median)")
R[libnfs.wr]=$(mibs "$SIZE_MIB" "$(printf '%s\n' "${wr[@]}" | median)")
drop; warm_server "$export_dir/bench-libnfs"
R[libnfs.r1]=$("$WORK/libnfs-randread" 127.0.0.1 "$export_path" /bench-libnfs 10 1)
R[libnfs.r4]=$("$WORK/libnfs-randread" 127.0.0.1 "$export_path" /bench-libnfs 10 4)

printf '\ncsi-nfs-fuse mount benchmark: %s MiB files, medians of %s runs; %s, %s cores, kernel %s, %s\n' \
    "$SIZE_MIB" "$RUNS" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$(nproc)" "$(uname -r)" \
    "$(ganesha.nfsd -v 2>&1 | grep -oE 'Release [^ ]+' | head -n1)"
printf '%-44s %14s %14s %14s\n' workload csi-nfs-fuse "libnfs" "bindfs (local)"
row() { printf '%-44s %14s %14s %14s\n' "$1" "$2" "$3" "$4"; }
row "seq write ${SIZE_MIB} MiB + fsync (MiB/s)" "${R[csi-nfs-fuse.w]}" "${R[libnfs.w]} (nfs-cp)" "${R[bindfs.w]}"
row "seq read, caches dropped (MiB/s)" "${R[csi-nfs-fuse.cr]}" "${R[libnfs.cr]} (nfs-cat)" "${R[bindfs.cr]}"
row "seq re-read, warm (MiB/s)" "${R[csi-nfs-fuse.wr]}" "${R[libnfs.wr]} (nfs-cat)" "${R[bindfs.wr]}"
row "4 KiB random read, 1 job, O_DIRECT (IOPS)" "${R[csi-nfs-fuse.r1]}" "${R[libnfs.r1]} (QD1)" "${R[bindfs.r1]}"
row "4 KiB random read, 4 jobs, O_DIRECT (IOPS)" "${R[csi-nfs-fuse.r4]}" "${R[libnfs.r4]} (4xQD1)" "${R[bindfs.r4]}"
row "create 10,000 empty files (s)" "${R[csi-nfs-fuse.c]}" "-" "${R[bindfs.c]}"
row "ls -l of those 10,000 (s)" "${R[csi-nfs-fuse.l]}" "-" "${R[bindfs.l]}"
row "rm of those 10,000 (s)" "${R[csi-nfs-fuse.d]}" "-" "${R[bindfs.d]}"
row "untar $TAR_ENTRIES entries / $TAR_MIB MiB (s)" "${R[csi-nfs-fuse.u]}" "-" "${R[bindfs.u]}"
printf 'mount process peak RSS with 4 parallel readers: %s MiB (cache_size default 256 MiB)\n' "$(( ${R[rss]} / 1024 ))"
