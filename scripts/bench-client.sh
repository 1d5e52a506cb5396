#!/usr/bin/env bash
# scripts/bench-client.sh - client-only throughput, no FUSE: csi-nfs-fuse cp
# against libnfs nfs-cp on the same ganesha export, in one run.
#
#   scripts/bench-client.sh [SIZE_MIB] [RUNS]     (defaults: 1024 MiB, 3 runs)
#
# WRITE copies /dev/shm -> server, READ copies server -> /dev/shm; each figure
# is the median of RUNS, in MiB/s. Starts the default loopback ganesha if it
# is not running. Prints a table and the ratios the issue's targets use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

SIZE_MIB=${1:-1024}
RUNS=${2:-3}
ensure_deps
"$GANESHA_SH" install libnfs-utils >/dev/null
eval "$("$GANESHA_SH" start)"
cargo build --release --quiet
BIN=$REPO_ROOT/target/release/csi-nfs-fuse
URL=nfs://127.0.0.1$export_path
SRC=/dev/shm/csi-nfs-fuse-bench.src
DST=/dev/shm/csi-nfs-fuse-bench.dst
trap 'rm -f "$SRC" "$DST" "$export_dir"/bench-*' EXIT
dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" status=none

# seconds for one command, as a float
timed() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN {print b - a}'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rate() { awk -v n="$SIZE_MIB" -v t="$1" 'BEGIN {print n / t}'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {print a / b}'; }

declare -A R
for tool in csi-nfs-fuse nfs-cp; do
    w=(); r=()
    for ((i = 0; i < RUNS; i++)); do
        sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
        if [[ $tool == csi-nfs-fuse ]]; then
            w+=("$(timed "$BIN" cp "$SRC" "$URL/bench-$tool")")
            sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
            r+=("$(timed "$BIN" cp "$URL/bench-$tool" "$DST")")
        else
            rm -f "$export_dir/bench-$tool"
            w+=("$(timed nfs-cp "$SRC" "$URL/bench-$tool")")
            sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
            r+=("$(timed nfs-cp "$URL/bench-$tool" "$DST")")
        fi
        cmp -s "$SRC" "$DST" || { echo "bench-client: $tool copy differs from the source" >&2; exit 1; }
        rm -f "$DST"
    done
    R[$tool.write]=$(rate "$(printf '%s\n' "${w[@]}" | median)")
    R[$tool.read]=$(rate "$(printf '%s\n' "${r[@]}" | median)")
done

printf '\nclient-only sequential throughput, %s MiB, median of %s runs (%s, %s cores)\n' "$SIZE_MIB" "$RUNS" "$(uname -r)" "$(nproc)"
printf '%-14s %12s %12s\n' tool "WRITE MiB/s" "READ MiB/s"
for tool in csi-nfs-fuse nfs-cp; do
    printf '%-14s %12.1f %12.1f\n' "$tool" "${R[$tool.write]}" "${R[$tool.read]}"
done
printf 'ratio          %12.2f %12.2f   (csi-nfs-fuse / nfs-cp; targets: WRITE >= 0.90, READ >= 1.00)\n' \
    "$(div "${R[csi-nfs-fuse.write]}" "${R[nfs-cp.write]}")" \
    "$(div "${R[csi-nfs-fuse.read]}" "${R[nfs-cp.read]}")"
