#!/usr/bin/env bash
# scripts/e2e-swarm.sh - csi-nfs-fuse as a Docker managed plugin, end to end.
#
# Usage (as root): scripts/e2e-swarm.sh [--binary PATH]
#   --binary PATH (or $CSI_NFS_FUSE_E2E_BINARY): the csi-nfs-fuse binary to
#   package; without it plugin/build.sh runs `cargo build --release`.
#   tests/e2e_swarm.rs runs this script from `cargo test` (scripts/test.sh).
#
# Stages (each timed; everything listens on 127.0.0.1 only):
#   1. smoke (any engine): plugin/build.sh assembles the rootfs and runs
#      docker plugin create + enable (dockerd starts `csi-nfs-fuse plugin` and
#      dials its socket: proves config.json, rootfs, entrypoint, socket path);
#      checks it is enabled and that its log reached dockerd's log.
#   2. CSI through the managed plugin (any engine; needs python3 and curl
#      with HTTP/2): what Swarm sends, sent by hand over the plugin's socket:
#      Probe, NodeGetInfo, CreateVolume, NodePublishVolume on
#      /data/published/<id>; the FUSE mount shows up on the host under the
#      plugin's propagated-mount dir, an nginx container bind-mounting it
#      (what dockerd does for a cluster mount) serves a file written into the
#      export and its own write lands on the server; then NodeUnpublish and
#      DeleteVolume. Then docker plugin disable + rm.
#   3. Swarm (Engine >= 28.2.0 only): single-node swarm on 127.0.0.1, plugin
#      created and enabled again, `docker volume create --driver ... --type mount
#      --scope multi --sharing all`, wait for "created", a global nginx service
#      (image made locally with docker import from Debian's nginx package) with
#      --mount type=cluster; HTTP serves a file written into the export, a
#      write from the container reaches the server; a second volume on a
#      second ganesha (own ports, onDelete=archive) proves isolation: killing
#      its server leaves the first volume working; service rm, volume rm,
#      DeleteVolume removes/archives the directories; plugin disable + rm;
#      swarm leave. NodePublish durations come from the plugin's log lines.
#
# Result: the last line is "e2e-swarm: PASS ...", or a "SKIP: <reason>" line
# (exit 0) when no engine is reachable, when not root, or when the engine is
# older than 28.2.0 (stage 3 cannot run there; stages 1-2 still do), or "e2e-swarm: FAIL ..."
# with a non-zero exit. Cleanup (services, volumes, containers, image,
# plugin, the swarm if this script created it, ganesha instances it started)
# runs on every exit path.
#
# Environment: CSI_NFS_FUSE_E2E_PLUGIN (plugin name, default csi-nfs-fuse-e2e),
# CSI_NFS_FUSE_E2E_TIMEOUT (seconds per wait, default 90).
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

PROG=e2e-swarm
MIN_ENGINE=28.2.0
PLUGIN=${CSI_NFS_FUSE_E2E_PLUGIN:-csi-nfs-fuse-e2e}
WAIT=${CSI_NFS_FUSE_E2E_TIMEOUT:-90}
BINARY=${CSI_NFS_FUSE_E2E_BINARY:-}
SOCK_NAME=csi-nfs-fuse.sock
ISO_GANESHA=e2e-swarm-iso
IMAGE=csi-nfs-fuse-e2e-nginx:latest
TAG=e2e$$
VOL1=$TAG-vol1
VOL2=$TAG-vol2
SVC1=$TAG-web1
SVC2=$TAG-web2
EMU_CONTAINER=$TAG-emul

while (($#)); do
    case $1 in
        --binary) [[ $# -ge 2 ]] || { echo "$PROG: --binary needs a path" >&2; exit 2; }; BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#--binary=}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$PROG: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

log() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }

T0=$SECONDS
PHASE=""
PHASE_T0=$SECONDS
TIMINGS=()
phase() {
    PHASE=$1
    PHASE_T0=$SECONDS
    log "---- $PHASE"
}
phase_done() {
    local d=$((SECONDS - PHASE_T0))
    TIMINGS+=("$PHASE=${d}s")
    log "---- $PHASE: ok in ${d}s"
}

# ---- state for cleanup ----------------------------------------------------
WORK=""
STARTED_DEFAULT_GANESHA=no
STARTED_ISO_GANESHA=no
SWARM_CREATED=no
IMAGE_BUILT=no
SERVICES=()
VOLUMES=()
EMU_MOUNTS=() # "volume_id target" pairs published by stage 2
EMU_VOLUME_ID="" # the volume stage 2 created and has not deleted yet
DOCKERD_LOG=""
DOCKERD_LOG_OFFSET=0
JOURNAL_SINCE=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if ((rc != 0)); then
        log "FAILED in phase '${PHASE:-setup}' after $((SECONDS - T0))s; diagnostics:"
        diagnostics
    fi
    local s v pair
    for s in "${SERVICES[@]}"; do docker service rm "$s" >/dev/null 2>&1; done
    docker rm -f "$EMU_CONTAINER" >/dev/null 2>&1
    for pair in "${EMU_MOUNTS[@]}"; do
        csi unpublish "${pair%% *}" "${pair#* }" >/dev/null 2>&1
    done
    [[ -n $EMU_VOLUME_ID ]] && csi delete "$EMU_VOLUME_ID" >/dev/null 2>&1
    for v in "${VOLUMES[@]}"; do
        docker volume rm "$v" >/dev/null 2>&1 || docker volume rm -f "$v" >/dev/null 2>&1
    done
    if docker plugin inspect "$PLUGIN" >/dev/null 2>&1; then
        docker plugin rm -f "$PLUGIN" >/dev/null 2>&1
    fi
    if [[ $IMAGE_BUILT == yes ]]; then
        # task containers go away after `docker service rm` returns; removing
        # the image before that would only untag it
        local i
        for ((i = 0; i < 60; i++)); do
            [[ -z $(docker ps -aq --filter "ancestor=$IMAGE" 2>/dev/null) ]] && break
            sleep 0.5
        done
        docker image rm -f "$IMAGE" >/dev/null 2>&1
    fi
    [[ $SWARM_CREATED == yes ]] && docker swarm leave --force >/dev/null 2>&1
    [[ $STARTED_ISO_GANESHA == yes ]] && "$GANESHA_SH" stop --name "$ISO_GANESHA" --purge >/dev/null 2>&1
    [[ $STARTED_DEFAULT_GANESHA == yes ]] && "$GANESHA_SH" stop --name default >/dev/null 2>&1
    [[ -n $WORK ]] && rm -rf "$WORK"
    if ((rc == 0)); then
        :
    else
        echo "e2e-swarm: FAIL (phase '${PHASE:-setup}', exit code $rc after $((SECONDS - T0))s)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- Docker engine and its log --------------------------------------------
command -v docker >/dev/null || { echo "SKIP: no Docker Engine reachable (no docker CLI on PATH)"; exit 0; }
ENGINE=$(docker version --format '{{.Server.Version}}' 2>/dev/null) || ENGINE=""
[[ -n $ENGINE ]] || { echo "SKIP: no Docker Engine reachable"; exit 0; }
ENGINE_NUM=${ENGINE%%[+~-]*}
[[ $EUID -eq 0 ]] || { echo "SKIP: needs root (ganesha, FUSE mounts, the plugin's host paths under /var/lib/docker and /run/docker)"; exit 0; }
command -v curl >/dev/null || die "curl is needed"
log "Docker Engine $ENGINE (client $(docker version --format '{{.Client.Version}}' 2>/dev/null))"

# dockerd's log: the file its stderr goes to, else the journal.
dockerd_pid=$(pidof dockerd 2>/dev/null | awk '{print $1}' || true)
if [[ -n $dockerd_pid ]]; then
    f=$(readlink "/proc/$dockerd_pid/fd/2" 2>/dev/null || true)
    if [[ -n $f && -f $f ]]; then
        DOCKERD_LOG=$f
        DOCKERD_LOG_OFFSET=$(stat -c %s "$f")
    fi
fi
if [[ -z $DOCKERD_LOG ]] && command -v journalctl >/dev/null; then
    JOURNAL_SINCE=$(date '+%Y-%m-%d %H:%M:%S')
fi
# dockerd log lines since this script started, ANSI colour codes removed
# (the plugin's stderr is logged by dockerd with its escapes quoted).
dockerd_log() {
    if [[ -n $DOCKERD_LOG ]]; then
        tail -c +"$((DOCKERD_LOG_OFFSET + 1))" "$DOCKERD_LOG"
    elif [[ -n $JOURNAL_SINCE ]]; then
        journalctl -u docker -o cat --since "$JOURNAL_SINCE" 2>/dev/null
    fi | sed -E 's/\\x1b\[[0-9;]*m//g; s/\x1b\[[0-9;]*m//g'
}
plugin_id() { docker plugin inspect --format '{{.Id}}' "$PLUGIN" 2>/dev/null; }
plugin_log() {
    local id
    id=$(plugin_id) || return 0
    dockerd_log | grep -F "plugin=$id" || true
}
plugin_log_has() { plugin_log | grep -q "$1"; }

# The plugin's own log lines (timestamp first), without dockerd's wrapping.
plugin_lines() { plugin_log | sed -E 's/.*msg="//; s/" plugin=[0-9a-f]+$//'; }
# publish_ms TARGET: for each publish of TARGET, milliseconds from the
# plugin's "NodePublishVolume" line to its supervisor's "mounted" line.
publish_ms() {
    local start="" ts line
    while read -r ts line; do
        if [[ $line == *"NodePublishVolume "*"target=$1 "* ]]; then
            start=$ts
        elif [[ -n $start && $line == *"supervisor: mounted "*"target=$1 "* ]]; then
            awk -v a="$(date -d "$start" +%s%N)" -v b="$(date -d "$ts" +%s%N)" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }'
            start=""
        fi
    done < <(plugin_lines)
}
RPC_LINES="NodePublishVolume|supervisor: mounted|NodeUnpublishVolume|CreateVolume|DeleteVolume|volume (deleted|archived)|WARN|ERROR"

diagnostics() {
    {
        echo "---- docker plugin ls"
        docker plugin ls 2>&1
        if [[ $SWARM_CREATED == yes ]]; then
            echo "---- docker volume ls --cluster"
            docker volume ls --cluster 2>&1
            local s
            for s in "${SERVICES[@]}"; do
                echo "---- docker service ps $s"
                docker service ps --no-trunc "$s" 2>&1 | head -n 10
            done
        fi
        echo "---- dockerd log since the start (last 60 lines)"
        dockerd_log | tail -n 60
    } >&2
}

# ---- helpers ----------------------------------------------------------------
WORK=$(mktemp -d /tmp/csi-nfs-fuse-e2e.XXXXXX)

# wait_for SECONDS DESCRIPTION COMMAND...: polls every 0.5 s.
wait_for() {
    local limit=$1 what=$2 t=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t < limit)) || die "timed out after ${limit}s waiting for $what"
        sleep 0.5
    done
    log "$what: after $((SECONDS - t))s"
}

free_port() {
    local p
    for ((p = $1; p < $1 + 200; p++)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free TCP port from $1"
}

http_get() { curl -fsS --max-time 5 "http://127.0.0.1:$1/$2"; }
http_has() { [[ $(http_get "$1" "$2" 2>/dev/null) == "$3" ]]; }
file_has() { [[ -f $1 && $(cat "$1" 2>/dev/null) == "$2" ]]; }
gone() { [[ ! -e $1 ]]; }

# ---- nginx image, built offline from Debian's nginx package ----------------
# Rootfs: /usr/sbin/nginx from the nginx .deb (apt-get download, no install),
# the libraries ldd lists, dash as /bin/sh (for docker exec), and a config
# that listens on 127.0.0.1:PORT (host network); nginx-2.conf on PORT2 serves
# a second service from the same image.
copy_with_libs() { # copy_with_libs ROOTFS BINARY DEST
    local root=$1 bin=$2 dest=$3 line lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$bin" "$root$dest"
    while read -r line; do
        lib=""
        if [[ $line =~ =\>\ (/[^ ]+) ]]; then lib=${BASH_REMATCH[1]}; elif [[ $line =~ ^(/[^ ]+)\ \( ]]; then lib=${BASH_REMATCH[1]}; fi
        [[ $line == *"not found"* ]] && die "$bin needs a library this host lacks: $line"
        if [[ -n $lib && ! -e $root$lib ]]; then
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        fi
    done < <(ldd "$bin" 2>/dev/null || true)
}

nginx_conf() { # nginx_conf PORT
    cat <<EOF
daemon off;
user root;
worker_processes 1;
pid /tmp/nginx-$1.pid;
error_log stderr notice;
events { worker_connections 64; }
http {
    include mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    client_body_temp_path /tmp/nginx-body;
    proxy_temp_path /tmp/nginx-proxy;
    fastcgi_temp_path /tmp/nginx-fastcgi;
    uwsgi_temp_path /tmp/nginx-uwsgi;
    scgi_temp_path /tmp/nginx-scgi;
    server {
        listen 127.0.0.1:$1;
        root /usr/share/nginx/html;
        location / { autoindex on; }
    }
}
EOF
}

build_nginx_image() {
    local root=$WORK/nginx-rootfs nginx_bin deb
    nginx_bin=""
    if [[ -x /usr/sbin/nginx ]]; then
        nginx_bin=/usr/sbin/nginx
    else
        mkdir -p "$WORK/deb"
        if ! (cd "$WORK/deb" && apt-get -qq -o APT::Sandbox::User=root download nginx >/dev/null 2>&1); then
            log "apt-get download nginx failed; running apt-get update once"
            apt-get -qq update >/dev/null 2>&1 || true
            (cd "$WORK/deb" && apt-get -qq -o APT::Sandbox::User=root download nginx >/dev/null) \
                || die "cannot get Debian's nginx package (apt-get download nginx)"
        fi
        deb=$(ls "$WORK"/deb/nginx_*.deb)
        dpkg-deb -x "$deb" "$WORK/deb/x"
        nginx_bin=$WORK/deb/x/usr/sbin/nginx
    fi
    copy_with_libs "$root" "$nginx_bin" /usr/sbin/nginx
    copy_with_libs "$root" "$(readlink -f /bin/sh)" /bin/sh
    mkdir -p "$root"/{etc/nginx,var/log/nginx,var/lib/nginx,run,tmp,usr/share/nginx/html,dev,proc,sys}
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
    printf 'types {\n    text/html html;\n    text/plain txt;\n}\n' >"$root/etc/nginx/mime.types"
    nginx_conf "$PORT1" >"$root/etc/nginx/nginx.conf"
    nginx_conf "$PORT2" >"$root/etc/nginx/nginx-2.conf"
    echo "image default page" >"$root/usr/share/nginx/html/index.html"
    tar -C "$root" -c . | docker import \
        -c 'CMD ["/usr/sbin/nginx"]' \
        -m "csi-nfs-fuse e2e: Debian nginx" - "$IMAGE" >/dev/null
    IMAGE_BUILT=yes
    # it must run before a volume is involved
    docker run --rm --network none --entrypoint /usr/sbin/nginx "$IMAGE" -t >/dev/null 2>&1 \
        || die "the nginx image does not run: $(docker run --rm --network none --entrypoint /usr/sbin/nginx "$IMAGE" -t 2>&1 | tail -n 3)"
}

# ---- a CSI client over the plugin's socket (stage 2) ------------------------
# gRPC over HTTP/2 with curl; the few CSI messages are encoded and decoded by
# a small protobuf codec (python3, standard library only).
cat >"$WORK/csi.py" <<'PYEOF'
import subprocess, sys, urllib.parse

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload

def s(num, text):
    return field(num, 2, text.encode())

def msg(num, body):
    return field(num, 2, body)

def mapf(num, d):
    return b"".join(msg(num, s(1, k) + s(2, v)) for k, v in d.items())

def parse(buf):
    i, out = 0, []
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = read_varint(buf, i)
        elif wire == 2:
            ln, i = read_varint(buf, i)
            val, i = buf[i:i + ln], i + ln
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError("bad wire type %d" % wire)
        out.append((num, val))
    return out

def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i

# mount access type, MULTI_NODE_MULTI_WRITER: what `--type mount --scope multi --sharing all` sends
CAPABILITY = msg(2, b"") + msg(3, field(1, 0, 5))

def call(sock, path, body):
    frame = b"\x00" + len(body).to_bytes(4, "big") + body
    p = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "30", "--unix-socket", sock,
         "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-",
         "-D", "/dev/stderr", "-o", "-", "http://localhost" + path],
        input=frame, capture_output=True)
    if p.returncode != 0:
        sys.exit("%s: curl failed: %s" % (path, p.stderr.decode(errors="replace").strip()))
    headers = {}
    for line in p.stderr.decode(errors="replace").splitlines():
        if ":" in line and not line.startswith("HTTP/"):
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    status = headers.get("grpc-status", "?")
    if status != "0":
        sys.exit("%s: grpc-status %s: %s" % (path, status, urllib.parse.unquote(headers.get("grpc-message", ""))))
    data = p.stdout
    return data[5:5 + int.from_bytes(data[1:5], "big")] if len(data) >= 5 else b""

def kv(args):
    return dict(a.split("=", 1) for a in args)

def main():
    sock, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if cmd == "probe":
        call(sock, "/csi.v1.Identity/Probe", b"")
    elif cmd == "node-id":
        for num, val in parse(call(sock, "/csi.v1.Node/NodeGetInfo", b"")):
            if num == 1:
                print(val.decode())
    elif cmd == "create":  # create NAME key=value...
        body = s(1, args[0]) + msg(3, CAPABILITY) + mapf(4, kv(args[1:]))
        resp = call(sock, "/csi.v1.Controller/CreateVolume", body)
        for num, val in parse(resp):
            if num != 1:
                continue
            for vnum, vval in parse(val):
                if vnum == 2:
                    print("volume_id=" + vval.decode())
                elif vnum == 3:
                    entry = dict(parse(vval))
                    print("ctx:%s=%s" % (entry.get(1, b"").decode(), entry.get(2, b"").decode()))
    elif cmd == "publish":  # publish VOLUME_ID TARGET ctx_key=value...
        body = s(1, args[0]) + s(4, args[1]) + msg(5, CAPABILITY) + mapf(8, kv(args[2:]))
        call(sock, "/csi.v1.Node/NodePublishVolume", body)
    elif cmd == "unpublish":  # unpublish VOLUME_ID TARGET
        call(sock, "/csi.v1.Node/NodeUnpublishVolume", s(1, args[0]) + s(2, args[1]))
    elif cmd == "delete":  # delete VOLUME_ID
        call(sock, "/csi.v1.Controller/DeleteVolume", s(1, args[0]))
    else:
        sys.exit("unknown command " + cmd)

main()
PYEOF
csi_sock() { echo "/run/docker/plugins/$(plugin_id)/$SOCK_NAME"; }
csi() { # csi COMMAND ARGS...
    python3 "$WORK/csi.py" "$(csi_sock)" "$@" 2>"$WORK/csi.err" \
        || { cat "$WORK/csi.err" >&2; return 1; }
}

# ---- ganesha on the host -----------------------------------------------------
phase "ganesha"
"$GANESHA_SH" install >/dev/null
"$GANESHA_SH" status --name default >/dev/null 2>&1 || STARTED_DEFAULT_GANESHA=yes
eval "$("$GANESHA_SH" start)"
# shellcheck disable=SC2154 # export_path, export_dir: set by the eval above
EXPORT_PATH=$export_path EXPORT_DIR=$export_dir
log "ganesha: nfs://127.0.0.1$EXPORT_PATH (dir $EXPORT_DIR)"
phase_done

PORT1=$(free_port 18080)
PORT2=$(free_port $((PORT1 + 1)))

# ---- stage 1: smoke -------------------------------------------------------------
phase "plugin create+enable"
build_args=(--name "$PLUGIN")
[[ -n $BINARY ]] && build_args+=(--binary "$BINARY")
plugin/build.sh "${build_args[@]}" CSI_NFS_FUSE_LOG=info >&2 || die "plugin/build.sh failed"
[[ $(docker plugin inspect --format '{{.Enabled}}' "$PLUGIN") == true ]] || die "$PLUGIN is not enabled"
[[ -S $(csi_sock) ]] || die "the plugin socket $(csi_sock) is missing"
phase_done

phase "plugin log in dockerd's log"
if [[ -n $DOCKERD_LOG || -n $JOURNAL_SINCE ]]; then
    wait_for 10 "the plugin's 'CSI plugin listening' line in dockerd's log" \
        plugin_log_has 'CSI plugin listening'
    plugin_log | grep 'CSI plugin listening' | tail -n 1 | sed 's/^/    /' >&2
else
    log "dockerd's log is neither a file nor in the journal; not checked"
fi
phase_done

# ---- stage 2: CSI calls through the managed plugin --------------------------------
phase "nginx image (docker import)"
build_nginx_image
phase_done

EMU_NS=0
EMU_PUBLISH_MS=""
if command -v python3 >/dev/null && curl -V | grep -qw HTTP2; then
    phase "CSI calls through the managed plugin"
    csi probe
    node_id=$(csi node-id)
    [[ $node_id == "$(cat /etc/hostname)" ]] || die "NodeGetInfo node_id '$node_id' is not the host's /etc/hostname"
    EMU_VOL=$TAG-emul
    created=$(csi create "$EMU_VOL" server=127.0.0.1 share="$EXPORT_PATH")
    vol_id=$(sed -n 's/^volume_id=//p' <<<"$created")
    mapfile -t ctx < <(sed -n 's/^ctx://p' <<<"$created")
    [[ -n $vol_id ]] || die "CreateVolume returned no volume_id"
    EMU_VOLUME_ID=$vol_id
    [[ -d $EXPORT_DIR/$EMU_VOL ]] || die "CreateVolume did not create $EXPORT_DIR/$EMU_VOL"
    emu_id=e2e$(od -An -N11 -tx1 /dev/urandom | tr -d ' \n')
    target=/data/published/$emu_id
    host_target=/var/lib/docker/plugins/$(plugin_id)/propagated-mount/$emu_id
    t=$(date +%s%N)
    csi publish "$vol_id" "$target" "${ctx[@]}"
    EMU_MOUNTS+=("$vol_id $target")
    EMU_NS=$(($(date +%s%N) - t))
    log "NodePublishVolume over the socket (python3 + curl included): $((EMU_NS / 1000000)) ms"
    grep -q " $host_target fuse" /proc/self/mounts \
        || die "the FUSE mount did not propagate to the host at $host_target"
    echo "hello from the export ($TAG)" >"$EXPORT_DIR/$EMU_VOL/index.html"
    docker run -d --name "$EMU_CONTAINER" --network host \
        -v "$host_target:/usr/share/nginx/html" "$IMAGE" >/dev/null
    wait_for "$WAIT" "nginx (plain container) serving the export's file" \
        http_has "$PORT1" index.html "hello from the export ($TAG)"
    docker exec "$EMU_CONTAINER" /bin/sh -c "echo written in the container > /usr/share/nginx/html/from-container.txt"
    wait_for 15 "the container's write on the server" \
        file_has "$EXPORT_DIR/$EMU_VOL/from-container.txt" "written in the container"
    docker rm -f "$EMU_CONTAINER" >/dev/null
    csi unpublish "$vol_id" "$target"
    EMU_MOUNTS=()
    ! grep -q " $host_target " /proc/self/mounts || die "NodeUnpublishVolume left $host_target mounted"
    [[ ! -e $host_target ]] || die "NodeUnpublishVolume did not remove $host_target"
    csi delete "$vol_id"
    EMU_VOLUME_ID=""
    [[ ! -e $EXPORT_DIR/$EMU_VOL ]] || die "DeleteVolume (onDelete=delete) left $EXPORT_DIR/$EMU_VOL"
    phase_done
    EMU_PUBLISH_MS=$(publish_ms "$target")
    log "NodePublishVolume in the plugin (request to mount ready, its log): ${EMU_PUBLISH_MS:-not found} ms"
    plugin_lines | grep -E "$RPC_LINES" | sed 's/^/    /' >&2 || true
else
    log "NOTE: stage 2 (CSI calls through the managed plugin) not run: it needs python3 and curl with HTTP/2"
fi

phase "plugin disable+rm"
docker plugin disable "$PLUGIN" >/dev/null || die "docker plugin disable $PLUGIN failed"
[[ $(docker plugin inspect --format '{{.Enabled}}' "$PLUGIN") == false ]] || die "$PLUGIN is still enabled"
[[ ! -e $(dirname "$(csi_sock)")/$SOCK_NAME ]] || log "note: the socket file outlived the plugin"
docker plugin rm "$PLUGIN" >/dev/null || die "docker plugin rm $PLUGIN failed"
! docker plugin inspect "$PLUGIN" >/dev/null 2>&1 || die "$PLUGIN is still installed"
phase_done

summary() {
    log "timings: ${TIMINGS[*]} total=$((SECONDS - T0))s"
    [[ -z $EMU_PUBLISH_MS ]] || log "stage 2 NodePublishVolume: ${EMU_PUBLISH_MS} ms in the plugin, $((EMU_NS / 1000000)) ms over the socket"
}

# ---- stage 3: the Swarm flow --------------------------------------------------------
if ! version_ge "$ENGINE_NUM" "$MIN_ENGINE"; then
    summary
    echo "SKIP: Docker Engine $ENGINE < $MIN_ENGINE: Swarm CSI volumes need Engine >= 28.2 (26.1-28.1 have the PluginAddr bug; < 23.0 has no cluster volumes)"
    exit 0
fi

swarm_state=$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown)
if [[ $swarm_state != inactive ]]; then
    if [[ $(docker node inspect "$(docker info --format '{{.Swarm.NodeID}}')" \
        --format '{{index .Spec.Labels "csi-nfs-fuse-e2e"}}' 2>/dev/null) == yes ]]; then
        log "leaving a swarm an earlier run of this script left behind"
        docker swarm leave --force >/dev/null
    else
        summary
        echo "SKIP: this engine is already in a swarm ($swarm_state); the Swarm stage only runs on a swarm it creates (docker swarm leave first)"
        exit 0
    fi
fi

phase "swarm init"
docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >/dev/null
SWARM_CREATED=yes
# marks the swarm as ours, so a later run may leave it if this one could not
docker node update --label-add csi-nfs-fuse-e2e=yes "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
phase_done

phase "plugin create+enable (swarm)"
build_args=(--name "$PLUGIN" --no-build)
[[ -n $BINARY ]] && build_args+=(--binary "$BINARY")
plugin/build.sh "${build_args[@]}" >&2 || die "plugin/build.sh failed"
phase_done

phase "second ganesha (isolation)"
STARTED_ISO_GANESHA=yes
eval "$("$GANESHA_SH" start --name "$ISO_GANESHA")"
# shellcheck disable=SC2154 # set by the eval above
ISO_EXPORT_PATH=$export_path ISO_EXPORT_DIR=$export_dir ISO_NFS_PORT=$nfs_port ISO_MOUNT_PORT=$mount_port
phase_done

# volume_created NAME: CreateVolume has answered (VolumeID set) and ls says "created".
volume_created() {
    local id
    id=$(docker volume inspect --format '{{with .ClusterVolume}}{{with .Info}}{{.VolumeID}}{{end}}{{end}}' "$1" 2>/dev/null) || return 1
    [[ -n $id ]] && docker volume ls --cluster 2>/dev/null | grep -E "^$1[[:space:]]" | grep -qw created
}
swarm_vol_id() { docker volume inspect --format '{{.ClusterVolume.ID}}' "$1"; }

phase "volume create (x2) until created"
docker volume create --driver "$PLUGIN" --type mount --scope multi --sharing all \
    --opt server=127.0.0.1 --opt share="$EXPORT_PATH" "$VOL1" >/dev/null
VOLUMES+=("$VOL1")
docker volume create --driver "$PLUGIN" --type mount --scope multi --sharing all \
    --opt server=127.0.0.1 --opt share="$ISO_EXPORT_PATH" --opt onDelete=archive \
    --opt mountOptions="port=$ISO_NFS_PORT,mountport=$ISO_MOUNT_PORT" "$VOL2" >/dev/null
VOLUMES+=("$VOL2")
wait_for "$WAIT" "$VOL1 created" volume_created "$VOL1"
wait_for "$WAIT" "$VOL2 created" volume_created "$VOL2"
docker volume ls --cluster | sed 's/^/    /' >&2
[[ -d $EXPORT_DIR/$VOL1 ]] || die "CreateVolume did not create $EXPORT_DIR/$VOL1"
[[ -d $ISO_EXPORT_DIR/$VOL2 ]] || die "CreateVolume did not create $ISO_EXPORT_DIR/$VOL2"
phase_done

echo "served from NFS ($VOL1)" >"$EXPORT_DIR/$VOL1/index.html"
echo "served from NFS ($VOL2)" >"$ISO_EXPORT_DIR/$VOL2/index.html"
echo "only in $VOL1" >"$EXPORT_DIR/$VOL1/only1.txt"

phase "global services with cluster mounts until serving"
docker service create --detach --name "$SVC1" --mode global --network host --no-resolve-image \
    --mount "type=cluster,src=$VOL1,dst=/usr/share/nginx/html" "$IMAGE" >/dev/null
SERVICES+=("$SVC1")
docker service create --detach --name "$SVC2" --mode global --network host --no-resolve-image \
    --mount "type=cluster,src=$VOL2,dst=/usr/share/nginx/html" "$IMAGE" \
    /usr/sbin/nginx -c /etc/nginx/nginx-2.conf >/dev/null
SERVICES+=("$SVC2")
wait_for "$WAIT" "$SVC1 serving $VOL1 over HTTP" http_has "$PORT1" index.html "served from NFS ($VOL1)"
wait_for "$WAIT" "$SVC2 serving $VOL2 over HTTP" http_has "$PORT2" index.html "served from NFS ($VOL2)"
docker volume ls --cluster | sed 's/^/    /' >&2
phase_done

task_container() { docker ps -q --filter "label=com.docker.swarm.service.name=$1" | head -n 1; }

phase "writes both ways"
c1=$(task_container "$SVC1")
[[ -n $c1 ]] || die "no running task container for $SVC1"
docker exec "$c1" /bin/sh -c "echo written in the task > /usr/share/nginx/html/from-task.txt"
wait_for 15 "the task's write on the server" file_has "$EXPORT_DIR/$VOL1/from-task.txt" "written in the task"
echo "new on the server" >"$EXPORT_DIR/$VOL1/later.txt"
wait_for 15 "a new server-side file over HTTP" http_has "$PORT1" later.txt "new on the server"
phase_done

phase "isolation: two volumes, then the second server dies"
http_get "$PORT2" only1.txt >/dev/null 2>&1 && die "$VOL2's service serves $VOL1's file"
[[ ! -e $ISO_EXPORT_DIR/$VOL2/only1.txt ]] || die "$VOL1's file appeared in $VOL2"
"$GANESHA_SH" kill --name "$ISO_GANESHA" >/dev/null
echo "still alive" >"$EXPORT_DIR/$VOL1/alive.txt"
wait_for 15 "$VOL1 still serving with the second server dead" http_has "$PORT1" alive.txt "still alive"
timeout 15 docker exec "$c1" /bin/sh -c "echo write while the other server is down > /usr/share/nginx/html/during.txt" \
    || die "a write to $VOL1 hung or failed while $VOL2's server was down"
wait_for 15 "$VOL1's write during the outage on the server" \
    file_has "$EXPORT_DIR/$VOL1/during.txt" "write while the other server is down"
"$GANESHA_SH" restart --name "$ISO_GANESHA" >/dev/null
echo "back" >"$ISO_EXPORT_DIR/$VOL2/back.txt"
wait_for "$WAIT" "$VOL2 serving again after its server restarted" http_has "$PORT2" back.txt "back"
phase_done

SVOL1=$(swarm_vol_id "$VOL1")
SVOL2=$(swarm_vol_id "$VOL2")

phase "service rm, volume rm, DeleteVolume"
docker service rm "$SVC1" "$SVC2" >/dev/null
SERVICES=()
for v in "$VOL1" "$VOL2"; do
    t=$SECONDS drained=no
    until docker volume rm "$v" >/dev/null 2>"$WORK/rm.err"; do
        if [[ $drained == no ]] && ((SECONDS - t >= 30)); then
            drained=yes
            log "$v still in use 30s after service rm ($(cat "$WORK/rm.err")); draining it"
            docker volume update --availability drain "$v" >/dev/null || true
        fi
        ((SECONDS - t < WAIT)) || die "docker volume rm $v kept failing: $(cat "$WORK/rm.err")"
        sleep 1
    done
    log "docker volume rm $v: after $((SECONDS - t))s"
done
VOLUMES=()
wait_for "$WAIT" "DeleteVolume removed $EXPORT_DIR/$VOL1 (onDelete=delete)" gone "$EXPORT_DIR/$VOL1"
wait_for "$WAIT" "DeleteVolume archived $VOL2 (onDelete=archive)" test -d "$ISO_EXPORT_DIR/archived-$VOL2"
[[ ! -e $ISO_EXPORT_DIR/$VOL2 ]] || die "$ISO_EXPORT_DIR/$VOL2 still exists next to its archive"
[[ -f $ISO_EXPORT_DIR/archived-$VOL2/back.txt ]] || die "the archive of $VOL2 lost its content"
prop_dir=/var/lib/docker/plugins/$(plugin_id)/propagated-mount
! grep -qE " $prop_dir/($SVOL1|$SVOL2) " /proc/self/mounts || die "a volume is still mounted under $prop_dir"
phase_done

# NodePublish durations, from the plugin's own log lines.
publish_ms=$( (publish_ms "/data/published/$SVOL1"; publish_ms "/data/published/$SVOL2") | paste -sd/ -)
log "NodePublishVolume in the plugin (request to mount ready, its log): ${publish_ms:-not found} ms ($VOL1/$VOL2)"
plugin_lines | grep -E "$RPC_LINES" | sed 's/^/    /' >&2 || true

phase "plugin disable+rm, swarm leave"
docker plugin disable "$PLUGIN" >/dev/null || docker plugin disable -f "$PLUGIN" >/dev/null
docker plugin rm "$PLUGIN" >/dev/null
docker swarm leave --force >/dev/null
SWARM_CREATED=no
phase_done

summary
echo "e2e-swarm: PASS (Docker Engine $ENGINE, whole flow $((SECONDS - T0))s, NodePublish ${publish_ms:-?} ms)"
