#!/usr/bin/env bash
# plugin/build.sh - build csi-nfs-fuse as a Docker managed plugin, no registry needed.
#
# Usage (as root, or a user that may talk to dockerd):
#   plugin/build.sh [--name NAME] [--binary PATH | --image IMAGE] [--no-build] [--rootfs-only] [KEY=VALUE...]
#
#   1. cargo build --release (skipped with --no-build or --binary PATH)
#   2. assembles plugin/build/rootfs: /csi-nfs-fuse (debug info stripped), exactly
#      the shared libraries `ldd` lists plus the dynamic loader, and the few
#      directories and /etc files the plugin needs; checks it runs in a chroot
#      (with --image IMAGE instead: the filesystem of IMAGE, e.g. one built
#      from the Dockerfile, via docker create + docker export)
#   3. writes plugin/build/config.json (a copy of plugin/config.json)
#   4. docker plugin rm -f NAME (if present), docker plugin create NAME plugin/build,
#      docker plugin set NAME KEY=VALUE... (if given), docker plugin enable NAME
#   --rootfs-only stops after step 3 (no Docker needed).
#
#   NAME defaults to $CSI_NFS_FUSE_PLUGIN_NAME or "csi-nfs-fuse"; Docker stores it
#   as NAME:latest. It must be the same on every node of a swarm, and it is
#   the --driver of `docker volume create`.
#   KEY=VALUE sets a settable variable before enabling, e.g.
#   CSI_NFS_FUSE_LOG=debug or CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS=nconnect=2.
#
# Idempotent: plugin/build/ is rebuilt from scratch and an existing plugin of
# that name is replaced. Replacing a plugin that serves mounted volumes ends
# those mounts (see README "Use with Docker Swarm", upgrades).
set -euo pipefail

PROG=plugin/build.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

PLUGIN_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$PLUGIN_DIR/.." && pwd)
OUT=$PLUGIN_DIR/build
ROOTFS=$OUT/rootfs

NAME=${CSI_NFS_FUSE_PLUGIN_NAME:-csi-nfs-fuse}
BINARY=""
IMAGE=""
BUILD=yes
DOCKER_STEPS=yes
SETTINGS=()

while (($#)); do
    case $1 in
        --name) [[ $# -ge 2 && -n $2 ]] || die "--name needs a value"; NAME=$2; shift 2 ;;
        --name=*) NAME=${1#--name=}; shift ;;
        --binary) [[ $# -ge 2 && -n $2 ]] || die "--binary needs a path"; BINARY=$2; BUILD=no; shift 2 ;;
        --binary=*) BINARY=${1#--binary=}; BUILD=no; shift ;;
        --image) [[ $# -ge 2 && -n $2 ]] || die "--image needs an image name"; IMAGE=$2; BUILD=no; shift 2 ;;
        --image=*) IMAGE=${1#--image=}; BUILD=no; shift ;;
        --no-build) BUILD=no; shift ;;
        --rootfs-only) DOCKER_STEPS=no; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *=*) SETTINGS+=("$1"); shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $NAME =~ ^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?$ ]] \
    || die "plugin name '$NAME' is not a valid Docker reference (lower case, digits, . _ - /)"
[[ -f $PLUGIN_DIR/config.json ]] || die "$PLUGIN_DIR/config.json is missing"
[[ -z $IMAGE || -z $BINARY ]] || die "give --binary or --image, not both"
[[ -z $IMAGE ]] || command -v docker >/dev/null || die "--image needs the docker CLI"

t0=$SECONDS
step_start=$SECONDS
step() {
    note "$1 done in $((SECONDS - step_start))s"
    step_start=$SECONDS
}

# ---- 1. the binary -------------------------------------------------------
if [[ $BUILD == yes ]]; then
    # shellcheck disable=SC1091
    if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then source "$HOME/.cargo/env"; fi
    command -v cargo >/dev/null || die "cargo not found (install Rust, or pass --binary PATH)"
    note "cargo build --release"
    (cd "$REPO_ROOT" && cargo build --release --bin csi-nfs-fuse) || die "cargo build --release failed"
    BINARY=$REPO_ROOT/target/release/csi-nfs-fuse
    step "build"
fi
# ---- 2. the rootfs -------------------------------------------------------
rootfs_from_image() {
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no local image '$IMAGE' (docker build -t $IMAGE . first)"
    local cid
    cid=$(docker create "$IMAGE") || die "docker create $IMAGE failed"
    if ! docker export "$cid" | tar -x -C "$ROOTFS"; then
        docker rm "$cid" >/dev/null 2>&1 || true
        die "docker export of $IMAGE failed"
    fi
    docker rm "$cid" >/dev/null
    [[ -x $ROOTFS/csi-nfs-fuse ]] || die "image $IMAGE has no executable /csi-nfs-fuse"
    mkdir -p "$ROOTFS"/{dev,proc,sys,etc,tmp,run/docker/plugins,data/published,data/staged}
    [[ -e $ROOTFS/node_hostname ]] || : >"$ROOTFS/node_hostname"
    note "rootfs: exported from image $IMAGE"
}

rootfs_from_binary() {
    local ldd_out line lib libs=() help
    [[ -n $BINARY ]] || BINARY=$REPO_ROOT/target/release/csi-nfs-fuse
    [[ -x $BINARY ]] || die "$BINARY is not an executable (build it first or drop --no-build)"
    help=$("$BINARY" plugin --help 2>&1) || help=""
    grep -q -- '--endpoint' <<<"$help" \
        || die "$BINARY has no working 'plugin' subcommand (not csi-nfs-fuse, or an old build?)"
    install -m 0755 "$BINARY" "$ROOTFS/csi-nfs-fuse"
    if command -v strip >/dev/null; then
        strip --strip-debug "$ROOTFS/csi-nfs-fuse" || note "strip failed; keeping debug info"
    fi

    # Shared libraries, each at the path the loader resolves it to on this host,
    # plus the loader at the ELF interpreter path. `ldd` output forms:
    #   libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
    #   /lib64/ld-linux-x86-64.so.2 (0x...)
    #   linux-vdso.so.1 (0x...)           (kernel-provided, nothing to copy)
    ldd_out=$(ldd "$BINARY" 2>&1) || {
        if grep -q "not a dynamic executable\|statically linked" <<<"$ldd_out"; then
            ldd_out=""
        else
            die "ldd $BINARY failed: $ldd_out"
        fi
    }
    if grep -q "not found" <<<"$ldd_out"; then
        die "$BINARY needs libraries this host lacks:"$'\n'"$(grep "not found" <<<"$ldd_out")"
    fi
    while read -r line; do
        if [[ $line =~ =\>\ (/[^ ]+) ]]; then
            libs+=("${BASH_REMATCH[1]}")
        elif [[ $line =~ ^(/[^ ]+)\ \( ]]; then
            libs+=("${BASH_REMATCH[1]}")
        fi
    done <<<"$ldd_out"
    for lib in "${libs[@]}"; do
        mkdir -p "$ROOTFS$(dirname "$lib")"
        cp -L "$lib" "$ROOTFS$lib"
    done
    note "rootfs: /csi-nfs-fuse + ${#libs[@]} libraries: ${libs[*]:-none (static)}"

    # What the plugin touches at run time. Docker mounts /proc, /sys, /dev (with
    # /dev/fuse from linux.devices), /run/docker/plugins (the socket dir),
    # /data/published (propagatedMount), /node_hostname, and for host networking
    # /etc/hosts and /etc/resolv.conf; the targets are created here so nothing
    # has to be created in the rootfs at start.
    mkdir -p "$ROOTFS"/{dev,proc,sys,etc,sbin,run/docker/plugins,data/published,data/staged,tmp}
    chmod 1777 "$ROOTFS/tmp"
    printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$ROOTFS/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"
    printf 'csi-nfs-fuse\n' >"$ROOTFS/etc/hostname"
    printf 'hosts: files dns\n' >"$ROOTFS/etc/nsswitch.conf"
    : >"$ROOTFS/etc/hosts"
    : >"$ROOTFS/etc/resolv.conf"
    : >"$ROOTFS/node_hostname"
    ln -s /csi-nfs-fuse "$ROOTFS/sbin/mount.fuse.csi-nfs-fuse"
}

rm -rf "$OUT"
mkdir -p "$ROOTFS"
if [[ -n $IMAGE ]]; then rootfs_from_image; else rootfs_from_binary; fi

# The rootfs must run on its own: no library from outside it.
if [[ $EUID -eq 0 ]] && command -v chroot >/dev/null; then
    check=$(chroot "$ROOTFS" /csi-nfs-fuse plugin --help 2>&1) \
        || die "the rootfs does not run /csi-nfs-fuse: $check"
    grep -q -- '--endpoint' <<<"$check" || die "/csi-nfs-fuse in the rootfs has no 'plugin' subcommand"
fi

# ---- 3. config.json ------------------------------------------------------
cp "$PLUGIN_DIR/config.json" "$OUT/config.json"
size=$(du -sh "$OUT" | cut -f1)
step "rootfs ($size in $OUT)"

if [[ $DOCKER_STEPS == no ]]; then
    note "--rootfs-only: not touching Docker; total $((SECONDS - t0))s"
    exit 0
fi

# ---- 4. docker plugin create + enable ------------------------------------
command -v docker >/dev/null || die "docker CLI not found (use --rootfs-only to only build the rootfs)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker Engine reachable (is dockerd running, and may this user use it?)"

if docker plugin inspect "$NAME" >/dev/null 2>&1; then
    note "removing the existing plugin $NAME"
    docker plugin rm -f "$NAME" >/dev/null || die "docker plugin rm -f $NAME failed"
fi
note "docker plugin create $NAME $OUT"
docker plugin create "$NAME" "$OUT" >/dev/null || die "docker plugin create $NAME $OUT failed"
step "create"
if ((${#SETTINGS[@]})); then
    docker plugin set "$NAME" "${SETTINGS[@]}" || die "docker plugin set $NAME ${SETTINGS[*]} failed"
fi

# Where dockerd writes its log (plugin output is in it, tagged plugin=<id>).
dockerd_log_hint() {
    local id pid log
    id=$(docker plugin inspect --format '{{.Id}}' "$NAME" 2>/dev/null || true)
    pid=$(pidof dockerd 2>/dev/null | awk '{print $1}' || true)
    log=""
    if [[ -n $pid ]]; then log=$(readlink "/proc/$pid/fd/2" 2>/dev/null || true); fi
    if [[ -n $log && -f $log ]]; then
        echo "---- $log, lines for plugin ${id:0:12} ----" >&2
        grep -F "${id:-$NAME}" "$log" | tail -n 30 >&2 || true
    else
        echo "dockerd log: journalctl -u docker (lines with plugin=$id)" >&2
    fi
}

note "docker plugin enable $NAME"
if ! docker plugin enable "$NAME"; then
    dockerd_log_hint
    die "docker plugin enable $NAME failed; the plugin stays installed but disabled"
fi
step "enable"
[[ $(docker plugin inspect --format '{{.Enabled}}' "$NAME") == true ]] \
    || die "docker plugin enable returned but $NAME is not enabled"
note "plugin $NAME is enabled (id $(docker plugin inspect --format '{{.Id}}' "$NAME" | cut -c1-12)); total $((SECONDS - t0))s"
