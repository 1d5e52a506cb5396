#!/usr/bin/env bash
# fuzz/run.sh [SECONDS] [TARGET...] - run the cargo-fuzz targets one after the
# other for SECONDS each (default 60), with the corpus kept in fuzz/corpus/.
# The toolchain here is stable; RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the
# sanitizer flags it needs. Installs cargo-fuzz from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(record_marking rpc_reply nfs_results mount_portmap mount_options csi_volume_id csi_params)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s"
    cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=8192 -print_final_stats=1 2>&1 \
        | grep -E '^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY)' || true
    # libFuzzer leaves crash-* files in artifacts/ on failure; make that loud.
    if compgen -G "artifacts/$t/crash-*" >/dev/null; then
        echo "fuzz/run.sh: $t found a crash: $(ls artifacts/"$t"/crash-*)" >&2
        exit 1
    fi
done
