# shellcheck shell=bash
# Shared helpers for scripts/test.sh and scripts/demo.sh (sourced, not run).

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GANESHA_SH=$REPO_ROOT/scripts/ganesha.sh
RUST_MIN_VERSION=1.85 # edition 2024

# Debian packages needed to build (the Rust toolchain itself comes from rustup).
BUILD_PACKAGES=(gcc libc6-dev pkg-config ca-certificates curl)

# Install apt deps (ganesha & co + build tools) and make sure cargo >= 1.85 is on PATH.
ensure_deps() {
    [[ $EUID -eq 0 ]] || { echo "${0##*/}: must run as root (NFS server, FUSE mounts)" >&2; return 1; }
    "$GANESHA_SH" install "${BUILD_PACKAGES[@]}"
    ensure_rust
    [[ -c /dev/fuse ]] || modprobe fuse 2>/dev/null || true
    [[ -c /dev/fuse ]] || { echo "${0##*/}: /dev/fuse is missing (no FUSE in this kernel/container?)" >&2; return 1; }
}

version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

ensure_rust() {
    # shellcheck disable=SC1091
    if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then source "$HOME/.cargo/env"; fi
    if ! command -v cargo >/dev/null; then
        echo "${0##*/}: installing the Rust toolchain with rustup" >&2
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
            | sh -s -- -y --quiet --profile minimal --default-toolchain stable >&2
        # shellcheck disable=SC1091
        source "$HOME/.cargo/env"
    fi
    local v
    v=$(cargo --version | awk '{print $2}')
    if ! version_ge "${v%%-*}" "$RUST_MIN_VERSION"; then
        command -v rustup >/dev/null \
            || { echo "${0##*/}: cargo $v is older than $RUST_MIN_VERSION and rustup is missing" >&2; return 1; }
        echo "${0##*/}: cargo $v < $RUST_MIN_VERSION, updating stable" >&2
        rustup toolchain install stable --profile minimal >&2
        rustup default stable >&2
    fi
}
