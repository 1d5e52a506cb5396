#!/usr/bin/env bash
# scripts/ganesha.sh - loopback NFSv3 server (nfs-ganesha, FSAL VFS) for the
# csi-nfs-fuse tests, benches, demo and CI.  Everything listens on 127.0.0.1.
#
# Usage (run as root):
#   scripts/ganesha.sh install [EXTRA_PKG...]
#       apt-get install the test dependencies (+ EXTRA_PKG) if missing
#       (idempotent, quiet; one apt-get update only when something is missing).
#   scripts/ganesha.sh start [--name NAME] [--squash root_squash|no_root_squash]
#                            [--privileged-port] [--nfs-port N] [--mount-port N]
#                            [--netns NS] [--bind ADDR] [--export-size MIB]
#       Start instance NAME (default: "default") with a FRESH, empty export
#       dir. If NAME is already running with the same options this is a no-op.
#       Prints key=value lines (shell-quoted, safe to `eval`):
#         name export_dir export_path host nfs_port mount_port pid log conf
#         state_dir rpcbind netns   (rpcbind=host|sandbox, see below)
#       --netns NS (named instances only): run ganesha inside network
#       namespace NS (a name from `ip netns add NS`, i.e. /run/netns/NS, or
#       a path to a netns file); the caller creates NS and its addresses.
#       --bind ADDR (named instances only): listen on ADDR instead of
#       127.0.0.1 (host= prints ADDR).  With --netns, ADDR must be an
#       address inside NS; readiness checks then run inside NS, so they
#       pass even while the namespace's outside links drop traffic.
#       kill/restart/stop/status work the same; restart reuses NS and ADDR.
#       --export-size MIB (named instances only): the export dir is a tmpfs
#       of MIB MiB, so a test can fill it (ENOSPC); stop --purge unmounts it.
#   scripts/ganesha.sh stop    [--name NAME | --all] [--purge]
#       SIGTERM, then SIGKILL after 15 s. State (export, log) is kept unless --purge.
#   scripts/ganesha.sh kill    [--name NAME]   SIGKILL (crash simulation; state kept)
#   scripts/ganesha.sh restart [--name NAME]   (stop if running, then) start again with
#       the SAME config, ports and export dir; the export content is kept.
#   scripts/ganesha.sh status  [--name NAME]   With NAME: key=value lines plus
#       running=yes|no, exit 0 if running, 3 if not. Without: one line per instance.
#
# State: ${CSI_NFS_FUSE_GANESHA_BASE:-/tmp/csi-nfs-fuse-ganesha}/NAME/
#   export/  ganesha.conf  ganesha.log  ganesha.pid  instance.env  recovery/
#
# Instances:
#   * "default" listens on NFS 2049 / MOUNT 20048 and registers with the
#     machine's rpcbind (started here if needed), so portmapper discovery
#     works: nfs://127.0.0.1<export_path> with no explicit ports.
#   * any other NAME gets its own ports (--nfs-port/--mount-port, or the
#     first free pair from 20100 up) and several can run next to "default".
#     Clients MUST use the explicit ports (libnfs URL:
#     nfs://127.0.0.1<export_path>?nfsport=N&mountport=M).  Ganesha always
#     unregisters/registers program 100003/100005 with rpcbind at start and
#     unregisters at exit, which would hijack/erase the default instance's
#     portmapper entries.  So named instances run in a private mount
#     namespace where /run/rpcbind.sock is a private "sandbox" rpcbind
#     (itself in an empty network namespace) and /etc/netconfig has no
#     connection-oriented inet transport, so libntirpc cannot fall back to
#     127.0.0.1:111: they can never touch the host rpcbind (if the sandbox is
#     gone, ganesha fails to start instead).  Needs unshare(1) and root.
#   * with --netns, ganesha and its sandbox rpcbind run inside the given
#     network namespace (nsenter(1)) instead of the host's / an empty one;
#     that rpcbind then also answers on port 111 of the netns addresses.
#
# Config notes (nfs-ganesha 4.3, Debian 12): Protocols = 3 only (no NFSv4
# listener), TCP only (Enable_UDP = false), no NLM/RQUOTA, Graceless so no
# grace period after (re)start, Attr_Expiration_Time = 0 so changes made
# directly in export/ are seen at once.  "Transports" is not an
# NFS_CORE_PARAM option in 4.3 (only per export).  There is no switch to
# turn dbus off; without a system bus ganesha logs DBUS CRIT lines and
# carries on.  ganesha.nfsd daemonizes and exits 0 even on fatal config
# errors, so readiness is checked with RPC NULL calls (rpcinfo -n PORT -t).
# FSAL VFS needs open_by_handle_at() support: ext4/xfs/btrfs/tmpfs are fine,
# overlayfs is not, so a tmpfs is mounted on the state base dir if it is on
# overlayfs (e.g. inside a container).  root_squash maps root to
# 65534:65534 (the export dir is mode 0777 so squashed root can write).
# File handles are the kernel's (name_to_handle_at), so they stay valid across
# kill/restart: clients can carry on after a restart.  Timings on a 2-core VM:
# start ~0.15 s (named ~0.6 s), SIGTERM stop 0.1-3 s.  Note: the Debian
# nfs-ganesha package Depends on nfs-common; the tests never use the kernel
# NFS client anyway.
set -euo pipefail

BASE=${CSI_NFS_FUSE_GANESHA_BASE:-/tmp/csi-nfs-fuse-ganesha}
HOST=127.0.0.1
DEFAULT_NFS_PORT=2049
DEFAULT_MOUNT_PORT=20048
AUTO_PORT_FIRST=20100
AUTO_PORT_LAST=20998
START_TIMEOUT=${CSI_NFS_FUSE_GANESHA_START_TIMEOUT:-30}
STOP_TIMEOUT=${CSI_NFS_FUSE_GANESHA_STOP_TIMEOUT:-15}
LOG_LEVEL=${CSI_NFS_FUSE_GANESHA_LOG_LEVEL:-NIV_EVENT}
PACKAGES=(nfs-ganesha nfs-ganesha-vfs rpcbind fuse3 libnfs-utils fio bindfs iproute2 nftables)
HOST_RPCBIND_SOCK=/run/rpcbind.sock

PROG=ganesha.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- install
cmd_install() { # [extra packages...]
    local missing=() p
    for p in "${PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID -eq 0 ]] || die "need root to install: ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; install manually: ${missing[*]}"
    note "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local out
    out=$(mktemp)
    if ! apt-get update -qq >"$out" 2>&1; then
        cat "$out" >&2; rm -f "$out"; die "apt-get update failed"
    fi
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$out" 2>&1; then
        cat "$out" >&2; rm -f "$out"; die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$out"
}

# ---------------------------------------------------------------- helpers
need_root() { [[ $EUID -eq 0 ]] || die "must run as root (ganesha needs CAP_DAC_READ_SEARCH etc.)"; }

need_tools() {
    local t
    for t in ganesha.nfsd rpcbind rpcinfo "$@"; do
        command -v "$t" >/dev/null || die "'$t' not found; run: scripts/ganesha.sh install"
    done
    compgen -G '/usr/lib/*/ganesha/libfsalvfs.so' >/dev/null \
        || compgen -G '/usr/lib*/ganesha/libfsalvfs.so' >/dev/null \
        || die "ganesha FSAL VFS not found; run: scripts/ganesha.sh install"
}

valid_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$ ]] || die "bad instance name '$1' (use [A-Za-z0-9_-])"; }

# Process is alive and not a zombie (pid 1 here may reap late).
alive() {
    local pid=$1 st
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Z]) .*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $st != Z && $st != X ]]
}

# Is $pid a ganesha.nfsd using config file $2?
is_our_ganesha() {
    local pid=$1 conf=$2
    alive "$pid" || return 1
    [[ $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") == ganesha.nfsd*" -f $conf "* ]]
}

is_our_rpcbind() {
    local pid=$1
    alive "$pid" || return 1
    [[ $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") == "rpcbind "* ]]
}

# Any live ganesha.nfsd process started with config $1? (no procps needed)
ganesha_procs_with_conf() {
    local d cmd
    for d in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline") || continue
        [[ $cmd == ganesha.nfsd*" -f $1 "* ]] && echo "${d#/proc/}"
    done
    return 0
}

wait_dead() { # pid timeout_s
    local pid=$1 deadline=$((SECONDS + $2))
    while alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# Run a command in the loaded instance's network namespace (if it has one).
in_netns() {
    if [[ -n ${I_NETNS:-} ]]; then
        nsenter --net="$I_NETNS" -- "$@"
    else
        "$@"
    fi
}

port_in_use() { # TCP listener on any address (of the instance's netns)?
    local hex
    hex=$(printf '%04X' "$1")
    in_netns grep -qE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

rpc_null() { # port prog vers: RPC NULL call over TCP to the instance's address:port
    in_netns timeout 5 rpcinfo -n "$1" -t "${I_BIND:-$HOST}" "$2" "$3" >/dev/null 2>&1
}

# --netns argument -> path of the namespace file
netns_path() {
    case $1 in
        /*) echo "$1" ;;
        *)
            [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,60}$ ]] || die "bad netns name '$1'"
            echo "/run/netns/$1"
            ;;
    esac
}

check_netns() { # path
    [[ -e $1 ]] || die "network namespace $1 does not exist (create it first: ip netns add NAME)"
    nsenter --net="$1" -- true 2>/dev/null || die "cannot enter network namespace $1"
}

registered() { # prog vers port: present in the host rpcbind over tcp?
    rpcinfo -p "$HOST" 2>/dev/null | grep -qE "^ *$1 +$2 +tcp +$3 "
}

ensure_host_rpcbind() {
    if ! timeout 5 rpcinfo -p "$HOST" >/dev/null 2>&1; then
        note "starting rpcbind"
        mkdir -p /run/rpcbind
        if getent passwd _rpc >/dev/null; then chown _rpc /run/rpcbind 2>/dev/null || true; fi
        rpcbind -w 9>&- || die "could not start rpcbind"
        local deadline=$((SECONDS + 10))
        until timeout 5 rpcinfo -p "$HOST" >/dev/null 2>&1; do
            ((SECONDS < deadline)) || die "rpcbind started but does not answer on $HOST:111"
            sleep 0.2
        done
    fi
    [[ -S $HOST_RPCBIND_SOCK ]] || die "rpcbind runs but $HOST_RPCBIND_SOCK is missing"
}

ensure_base() {
    mkdir -p "$BASE"
    if [[ $(stat -f -c %T "$BASE") == overlayfs ]] && ! mountpoint -q "$BASE"; then
        note "$BASE is on overlayfs (no file handles for FSAL VFS); mounting a tmpfs there"
        mount -t tmpfs -o mode=0755 csi-nfs-fuse-ganesha "$BASE" || die "mount tmpfs on $BASE failed"
    fi
}

lock_base() {
    ensure_base
    exec 9>"$BASE/.lock"
    flock -w 120 9 || die "timed out waiting for lock $BASE/.lock"
}

# Instance variables (set by load_instance / new_instance)
I_NAME= I_DIR= I_SQUASH= I_PRIV= I_NFS_PORT= I_MOUNT_PORT= I_SANDBOX=
I_NETNS='' I_BIND=$HOST # --netns path ('' = the caller's), listen address
I_SIZE='' # --export-size in MiB ('' = the export is a plain directory)

set_paths() {
    I_DIR=$BASE/$I_NAME
    I_EXPORT=$I_DIR/export
    I_CONF=$I_DIR/ganesha.conf
    I_LOG=$I_DIR/ganesha.log
    I_PIDF=$I_DIR/ganesha.pid
    I_RPCB_DIR=$I_DIR/rpcbind-run
    I_RPCB_PIDF=$I_DIR/rpcbind.pid
    I_NETCONFIG=$I_DIR/netconfig
}

load_instance() { # name -> 0 if instance.env exists
    I_NAME=$1
    set_paths
    [[ -f $I_DIR/instance.env ]] || return 1
    I_NETNS="" I_BIND=$HOST I_SIZE="" # instance.env files older than these options lack them
    # shellcheck disable=SC1091
    source "$I_DIR/instance.env"
}

save_instance() {
    {
        printf 'I_SQUASH=%q\n' "$I_SQUASH"
        printf 'I_PRIV=%q\n' "$I_PRIV"
        printf 'I_NFS_PORT=%q\n' "$I_NFS_PORT"
        printf 'I_MOUNT_PORT=%q\n' "$I_MOUNT_PORT"
        printf 'I_SANDBOX=%q\n' "$I_SANDBOX"
        printf 'I_NETNS=%q\n' "$I_NETNS"
        printf 'I_BIND=%q\n' "$I_BIND"
        printf 'I_SIZE=%q\n' "$I_SIZE"
    } >"$I_DIR/instance.env"
}

# the --export-size tmpfs of the loaded instance, before its directory goes
unmount_export() {
    if mountpoint -q "$I_EXPORT" 2>/dev/null; then
        umount "$I_EXPORT" 2>/dev/null || umount -l "$I_EXPORT" || die "cannot unmount $I_EXPORT"
    fi
}

ganesha_pid() { # prints pid if running
    local pid
    [[ -f $I_PIDF ]] || return 1
    pid=$(tr -dc '0-9' <"$I_PIDF")
    is_our_ganesha "$pid" "$I_CONF" || return 1
    echo "$pid"
}

rpcbind_pid() {
    local pid
    [[ -f $I_RPCB_PIDF ]] || return 1
    pid=$(tr -dc '0-9' <"$I_RPCB_PIDF")
    is_our_rpcbind "$pid" || return 1
    echo "$pid"
}

print_env() { # [pid]
    local pid=${1:-}
    printf '%s=%q\n' \
        name "$I_NAME" \
        state_dir "$I_DIR" \
        export_dir "$I_EXPORT" \
        export_path "$I_EXPORT" \
        host "$I_BIND" \
        nfs_port "$I_NFS_PORT" \
        mount_port "$I_MOUNT_PORT" \
        squash "$I_SQUASH" \
        privileged_port "$I_PRIV" \
        rpcbind "$([[ $I_SANDBOX == yes ]] && echo sandbox || echo host)" \
        netns "$I_NETNS" \
        pid "$pid" \
        log "$I_LOG" \
        conf "$I_CONF"
}

ports_claimed() { # ports used by other instances' configs
    local f
    for f in "$BASE"/*/instance.env; do
        [[ -f $f && $f != "$I_DIR/instance.env" ]] || continue
        (source "$f"; echo "$I_NFS_PORT"; echo "$I_MOUNT_PORT")
    done
}

pick_ports() {
    local claimed p
    claimed=" $(ports_claimed | tr '\n' ' ') "
    for ((p = AUTO_PORT_FIRST; p <= AUTO_PORT_LAST; p += 2)); do
        [[ $claimed == *" $p "* || $claimed == *" $((p + 1)) "* ]] && continue
        port_in_use "$p" && continue
        port_in_use "$((p + 1))" && continue
        I_NFS_PORT=$p I_MOUNT_PORT=$((p + 1))
        return 0
    done
    die "no free port pair in $AUTO_PORT_FIRST-$((AUTO_PORT_LAST + 1))"
}

write_conf() {
    local dbus_prefix=""
    [[ $I_NAME == default ]] || dbus_prefix="  Dbus_Name_Prefix = csinfsfuse_${I_NAME//-/_};"
    cat >"$I_CONF" <<EOF
# generated by scripts/ganesha.sh for instance '$I_NAME'
NFS_CORE_PARAM {
  Protocols = 3;
  Enable_UDP = false;
  NFS_Port = $I_NFS_PORT;
  MNT_Port = $I_MOUNT_PORT;
  Bind_addr = $I_BIND;
  Enable_NLM = false;
  Enable_RQUOTA = false;
  Clustered = false;
  heartbeat_freq = 0;
$dbus_prefix
}
NFS_KRB5 {
  Active_krb5 = false;
}
NFSV4 {
  Graceless = true;
  RecoveryRoot = "$I_DIR/recovery";
}
EXPORT {
  Export_Id = 1;
  Path = "$I_EXPORT";
  Pseudo = "$I_EXPORT";
  Protocols = 3;
  Transports = TCP;
  Access_Type = RW;
  Squash = $I_SQUASH;
  Anonymous_uid = 65534;
  Anonymous_gid = 65534;
  SecType = sys;
  PrivilegedPort = $I_PRIV;
  Attr_Expiration_Time = 0;
  FSAL {
    Name = VFS;
  }
}
EOF
}

start_sandbox_rpcbind() {
    local pid
    if pid=$(rpcbind_pid); then return 0; fi
    rm -rf "$I_RPCB_DIR"
    mkdir -p "$I_RPCB_DIR/rpcbind"
    # new net+mount namespace: binds *:111 of an empty netns, socket lands
    # in $I_RPCB_DIR/rpcbind.sock.  setsid: survive the caller's pgrp.
    # With --netns it runs in that netns instead of an empty one (rpcinfo -n,
    # used for the readiness checks, always asks rpcbind on port 111 of the
    # target first).  nsenter/unshare exec without forking: the pid is rpcbind's.
    if [[ -n $I_NETNS ]]; then
        setsid sh -c 'echo $$ >"$1"; exec nsenter --net="$3" -- unshare --mount --propagation private -- \
            sh -c "mount --bind \"\$0\" /run && exec rpcbind -f" "$2"' \
            sh "$I_RPCB_PIDF" "$I_RPCB_DIR" "$I_NETNS" </dev/null >"$I_DIR/rpcbind.out" 2>&1 9>&- &
    else
        setsid sh -c 'echo $$ >"$1"; exec unshare --net --mount --propagation private -- \
            sh -c "mount --bind \"\$0\" /run && exec rpcbind -f" "$2"' \
            sh "$I_RPCB_PIDF" "$I_RPCB_DIR" </dev/null >"$I_DIR/rpcbind.out" 2>&1 9>&- &
    fi
    local deadline=$((SECONDS + 10))
    until [[ -S $I_RPCB_DIR/rpcbind.sock ]]; do
        if ((SECONDS >= deadline)); then
            cat "$I_DIR/rpcbind.out" >&2 || true
            die "sandbox rpcbind for '$I_NAME' did not come up (unshare --net --mount needs root/CAP_SYS_ADMIN)"
        fi
        sleep 0.1
    done
    rpcbind_pid >/dev/null || die "sandbox rpcbind for '$I_NAME' exited: $(cat "$I_DIR/rpcbind.out")"
}

stop_sandbox_rpcbind() {
    local pid
    if pid=$(rpcbind_pid); then
        kill -TERM "$pid" 2>/dev/null || true
        wait_dead "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$I_RPCB_PIDF"
}

launch() {
    local log_start pid deadline
    rm -f "$I_PIDF"
    mkdir -p "$I_DIR/recovery"
    log_start=$( [[ -f $I_LOG ]] && wc -l <"$I_LOG" || echo 0)
    if [[ $I_SANDBOX == yes ]]; then
        start_sandbox_rpcbind
        # netconfig without connection-oriented inet transports: libntirpc's
        # local_rpcb() then cannot fall back to 127.0.0.1:111 (host rpcbind)
        sed -E 's/^(tcp6?[[:space:]]+)tpi_cots_ord/\1tpi_raw     /' /etc/netconfig >"$I_NETCONFIG"
        # $7: network namespace to run in ("" = the caller's)
        unshare --mount --propagation slave -- sh -c '
            mount --bind "$1" /run/rpcbind.sock && mount --bind "$2" /etc/netconfig || exit 1
            if [ -n "$7" ]; then
                exec nsenter --net="$7" -- ganesha.nfsd -f "$3" -L "$4" -p "$5" -N "$6"
            fi
            exec ganesha.nfsd -f "$3" -L "$4" -p "$5" -N "$6"' \
            sh "$I_RPCB_DIR/rpcbind.sock" "$I_NETCONFIG" "$I_CONF" "$I_LOG" "$I_PIDF" "$LOG_LEVEL" \
            "$I_NETNS" \
            </dev/null >/dev/null 2>"$I_DIR/ganesha.stderr" 9>&- \
            || die "launching ganesha.nfsd for '$I_NAME' failed: $(cat "$I_DIR/ganesha.stderr")"
    else
        ganesha.nfsd -f "$I_CONF" -L "$I_LOG" -p "$I_PIDF" -N "$LOG_LEVEL" \
            </dev/null >/dev/null 2>"$I_DIR/ganesha.stderr" 9>&- \
            || die "launching ganesha.nfsd failed: $(cat "$I_DIR/ganesha.stderr")"
    fi

    deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if pid=$(ganesha_pid) \
            && rpc_null "$I_NFS_PORT" 100003 3 && rpc_null "$I_MOUNT_PORT" 100005 3 \
            && { [[ $I_SANDBOX == yes ]] || { registered 100003 3 "$I_NFS_PORT" && registered 100005 3 "$I_MOUNT_PORT"; }; }; then
            break
        fi
        # ganesha.nfsd forks; once the pid file was written the daemon must stay up
        if [[ -z $(ganesha_procs_with_conf "$I_CONF") ]]; then
            cat "$I_DIR/ganesha.stderr" >&2 2>/dev/null || true
            tail -n +"$((log_start + 1))" "$I_LOG" 2>/dev/null | grep -E 'CRIT|MAJ|FATAL|WARN' \
                | grep -v -E 'DBUS|krb5|keytab|principal|RADOS' >&2 || true
            die "ganesha.nfsd for '$I_NAME' exited during startup; see $I_LOG"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$I_LOG" >&2 2>/dev/null || true
            die "ganesha '$I_NAME' not answering on $I_BIND:$I_NFS_PORT/$I_MOUNT_PORT${I_NETNS:+ (netns $I_NETNS)} after ${START_TIMEOUT}s; see $I_LOG"
        fi
        sleep 0.1
    done
    # ganesha keeps running even when the export could not be set up (bad
    # path, fs without file handles, config syntax errors): catch that here
    local bad
    bad=$(tail -n +"$((log_start + 1))" "$I_LOG" \
        | grep -E ':EXPORT :(CRIT|MAJ|FATAL)|FSAL :(CRIT|MAJ)|No export entries|syntax error|Configuration syntax errors' || true)
    if [[ -n $bad ]]; then
        echo "$bad" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait_dead "$pid" 10 || true
        die "ganesha '$I_NAME' started but its export is broken; see $I_LOG"
    fi
    echo "$pid"
}

# stop the ganesha process of the loaded instance; $1 = TERM|KILL
stop_ganesha() {
    local sig=$1 pid
    pid=$(ganesha_pid) || return 0
    if [[ $sig == TERM && $I_SANDBOX == yes ]] && ! rpcbind_pid >/dev/null; then
        # a clean exit would try to unregister; without the sandbox that fails
        # (harmless thanks to the netconfig) but kill hard to be quick
        sig=KILL
    fi
    kill -"$sig" "$pid" 2>/dev/null || true
    if ! wait_dead "$pid" "$([[ $sig == TERM ]] && echo "$STOP_TIMEOUT" || echo 10)"; then
        if [[ $sig == TERM ]]; then
            note "ganesha '$I_NAME' (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_dead "$pid" 10 || die "ganesha pid $pid does not die"
        else
            die "ganesha pid $pid does not die after SIGKILL"
        fi
    fi
}

# drop stale host-rpcbind entries of the default instance (after SIGKILL)
clean_host_registration() {
    [[ $I_SANDBOX == yes ]] && return 0
    if registered 100003 3 "$I_NFS_PORT"; then rpcinfo -d 100003 3 2>/dev/null || true; fi
    if registered 100005 3 "$I_MOUNT_PORT"; then
        rpcinfo -d 100005 3 2>/dev/null || true
        rpcinfo -d 100005 1 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------- commands
parse_name_only() { # sets NAME, ALL
    NAME=default ALL=no PURGE=no
    while (($#)); do
        case $1 in
            --name) (($# >= 2)) || die "--name needs a value"; NAME=$2; shift 2 ;;
            --name=*) NAME=${1#*=}; shift ;;
            --all) ALL=yes; shift ;;
            --purge) PURGE=yes; shift ;;
            -h | --help) usage ;;
            *) die "unknown argument '$1'" ;;
        esac
    done
    valid_name "$NAME"
}

cmd_start() {
    local name=default squash=no_root_squash priv=false nfs_port="" mount_port="" pid
    local netns="" bind="" size=""
    while (($#)); do
        case $1 in
            --name) (($# >= 2)) || die "--name needs a value"; name=$2; shift 2 ;;
            --name=*) name=${1#*=}; shift ;;
            --squash) (($# >= 2)) || die "--squash needs a value"; squash=$2; shift 2 ;;
            --squash=*) squash=${1#*=}; shift ;;
            --privileged-port) priv=true; shift ;;
            --nfs-port) (($# >= 2)) || die "--nfs-port needs a value"; nfs_port=$2; shift 2 ;;
            --nfs-port=*) nfs_port=${1#*=}; shift ;;
            --mount-port) (($# >= 2)) || die "--mount-port needs a value"; mount_port=$2; shift 2 ;;
            --mount-port=*) mount_port=${1#*=}; shift ;;
            --netns) (($# >= 2)) || die "--netns needs a value"; netns=$2; shift 2 ;;
            --netns=*) netns=${1#*=}; shift ;;
            --bind) (($# >= 2)) || die "--bind needs a value"; bind=$2; shift 2 ;;
            --bind=*) bind=${1#*=}; shift ;;
            --export-size) (($# >= 2)) || die "--export-size needs a value"; size=$2; shift 2 ;;
            --export-size=*) size=${1#*=}; shift ;;
            -h | --help) usage ;;
            *) die "unknown argument '$1'" ;;
        esac
    done
    valid_name "$name"
    if [[ $name == default && -n $netns$bind$size ]]; then
        die "--netns/--bind/--export-size are for named instances only (the default instance always uses $HOST and a plain directory)"
    fi
    [[ -z $size || ($size =~ ^[0-9]+$ && $size -gt 0) ]] || die "--export-size takes a size in MiB, not '$size'"
    [[ -z $netns ]] || netns=$(netns_path "$netns")
    [[ -z $bind || $bind =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "--bind takes an IPv4 address, not '$bind'"
    bind=${bind:-$HOST}
    case $squash in root_squash | no_root_squash) ;; *) die "--squash must be root_squash or no_root_squash" ;; esac
    for p in $nfs_port $mount_port; do
        [[ $p =~ ^[0-9]+$ ]] && ((p > 0 && p < 65536)) || die "bad port '$p'"
    done
    need_root
    need_tools flock
    [[ $name == default ]] || need_tools unshare setsid
    [[ -z $netns ]] || { need_tools nsenter; check_netns "$netns"; }
    lock_base
    ensure_host_rpcbind

    if load_instance "$name" && pid=$(ganesha_pid); then
        [[ $I_SQUASH == "$squash" && $I_PRIV == "$priv" \
            && (-z $nfs_port || $nfs_port == "$I_NFS_PORT") \
            && (-z $mount_port || $mount_port == "$I_MOUNT_PORT") \
            && $I_NETNS == "$netns" && $I_BIND == "$bind" && $I_SIZE == "$size" ]] \
            || die "instance '$name' already runs with other options (squash=$I_SQUASH privileged_port=$I_PRIV ports=$I_NFS_PORT/$I_MOUNT_PORT netns=${I_NETNS:-none} bind=$I_BIND export_size=${I_SIZE:-none}); stop it first"
        if rpc_null "$I_NFS_PORT" 100003 3 && rpc_null "$I_MOUNT_PORT" 100005 3; then
            print_env "$pid"
            return 0
        fi
        note "instance '$name' (pid $pid) does not answer; restarting it fresh"
        stop_ganesha KILL
    fi

    # fresh instance
    I_NAME=$name
    set_paths
    stop_sandbox_rpcbind
    unmount_export
    rm -rf "$I_DIR"
    mkdir -p "$I_EXPORT" "$I_DIR/recovery"
    I_SIZE=$size
    if [[ -n $size ]]; then
        mount -t tmpfs -o "size=${size}m" csi-nfs-fuse-ganesha-export "$I_EXPORT" \
            || die "mount a ${size} MiB tmpfs on $I_EXPORT failed"
    fi
    chmod 0777 "$I_EXPORT" # root_squash'ed root (uid 65534) must be able to create files
    I_SQUASH=$squash I_PRIV=$priv I_NETNS=$netns I_BIND=$bind
    if [[ $name == default ]]; then
        I_SANDBOX=no
        I_NFS_PORT=${nfs_port:-$DEFAULT_NFS_PORT} I_MOUNT_PORT=${mount_port:-$DEFAULT_MOUNT_PORT}
    else
        I_SANDBOX=yes
        if [[ -n $nfs_port && -n $mount_port ]]; then
            I_NFS_PORT=$nfs_port I_MOUNT_PORT=$mount_port
        elif [[ -n $nfs_port || -n $mount_port ]]; then
            die "give both --nfs-port and --mount-port, or neither"
        else
            pick_ports
        fi
    fi
    [[ $I_NFS_PORT != "$I_MOUNT_PORT" ]] || die "NFS and MOUNT ports must differ"
    local p
    for p in "$I_NFS_PORT" "$I_MOUNT_PORT"; do
        port_in_use "$p" && die "TCP port $p is already in use (kernel nfsd? another ganesha? see: scripts/ganesha.sh status)"
    done
    write_conf
    save_instance
    pid=$(launch) || { stop_sandbox_rpcbind; exit 1; }
    print_env "$pid"
}

cmd_restart() {
    local pid
    parse_name_only "$@"
    need_root
    need_tools flock
    [[ $NAME == default ]] || need_tools unshare setsid
    lock_base
    load_instance "$NAME" || die "no instance '$NAME' (under $BASE) to restart; use start"
    [[ -d $I_EXPORT && -f $I_CONF ]] || die "instance '$NAME' state is incomplete ($I_DIR)"
    [[ -z $I_NETNS ]] || { need_tools nsenter; check_netns "$I_NETNS"; }
    ensure_host_rpcbind
    stop_ganesha TERM
    pid=$(launch) || { stop_sandbox_rpcbind; exit 1; }
    print_env "$pid"
}

cmd_stop() {
    parse_name_only "$@"
    need_root
    lock_base
    local names=("$NAME") n
    if [[ $ALL == yes ]]; then
        names=()
        for n in "$BASE"/*/instance.env; do
            [[ -f $n ]] && names+=("$(basename "$(dirname "$n")")")
        done
    fi
    for n in "${names[@]}"; do
        if ! load_instance "$n"; then
            note "no instance '$n'"
            continue
        fi
        stop_ganesha TERM
        stop_sandbox_rpcbind
        clean_host_registration
        rm -f "$I_PIDF"
        if [[ $PURGE == yes ]]; then
            unmount_export
            rm -rf "$I_DIR"
            note "stopped '$n' and removed $I_DIR"
        else
            note "stopped '$n' (state kept in $I_DIR)"
        fi
    done
}

cmd_kill() {
    local pid
    parse_name_only "$@"
    need_root
    lock_base
    load_instance "$NAME" || die "no instance '$NAME'"
    pid=$(ganesha_pid) || { note "instance '$NAME' is not running"; return 0; }
    stop_ganesha KILL
    note "killed '$NAME' (pid $pid) with SIGKILL"
}

cmd_status() {
    local pid n explicit=no
    for a in "$@"; do [[ $a == --name* ]] && explicit=yes; done
    parse_name_only "$@"
    if [[ $explicit == yes ]]; then
        load_instance "$NAME" || { echo "running=no"; return 3; }
        if pid=$(ganesha_pid) && rpc_null "$I_NFS_PORT" 100003 3; then
            print_env "$pid"
            echo "running=yes"
            return 0
        fi
        print_env ""
        echo "running=no"
        return 3
    fi
    local any=no
    for n in "$BASE"/*/instance.env; do
        [[ -f $n ]] || continue
        any=yes
        load_instance "$(basename "$(dirname "$n")")"
        if pid=$(ganesha_pid); then
            printf '%-12s running  pid=%-7s nfs_port=%-5s mount_port=%-5s squash=%s privileged_port=%s export=%s%s\n' \
                "$I_NAME" "$pid" "$I_NFS_PORT" "$I_MOUNT_PORT" "$I_SQUASH" "$I_PRIV" "$I_EXPORT" \
                "${I_NETNS:+ netns=$I_NETNS bind=$I_BIND}"
        else
            printf '%-12s stopped  state=%s\n' "$I_NAME" "$I_DIR"
        fi
    done
    [[ $any == yes ]] || echo "no instances under $BASE"
}

main() {
    (($#)) || usage
    local cmd=$1
    shift
    case $cmd in
        install) cmd_install "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        kill) cmd_kill "$@" ;;
        restart) cmd_restart "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        *) die "unknown command '$cmd' (install|start|stop|kill|restart|status)" ;;
    esac
}

main "$@"
