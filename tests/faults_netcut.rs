//! Issue 7, "a network cut with no process exit": the server sits in a
//! network namespace of its own behind a veth pair, and its traffic is
//! silently dropped (nftables DROP inside the namespace: no RST, no ICMP,
//! ARP still answered) while every process keeps running.
//!
//! Expectations, as for a server outage:
//! - `hard`: I/O that needs the server blocks during the cut and completes
//!   with no error once the cut is lifted; the data reaches the server;
//! - `soft`: I/O fails with EIO within about timeo×retrans, and the mount
//!   works again after the cut;
//! - isolation: a mount of another (healthy) server keeps reading and
//!   writing throughout the cut, each operation within 2 s.
//!
//! Needs root, iproute2 (`ip netns`), nftables and nsenter. Without them the
//! test prints SKIP, except under scripts/test.sh
//! (CSI_NFS_FUSE_REQUIRE_GANESHA=1), where it fails. (tc netem would do too,
//! but sch_netem is often not built into CI kernels; nftables is.)
//!
//! Every wait is bounded: blocking file operations run on their own threads,
//! and the guards lift the cut, stop the mounts (SIGKILL and lazy unmount if
//! need be, which aborts stuck requests) and delete the namespace on every
//! exit path. Tests in this file share the fixed 10.213.77.0/30 veth subnet,
//! so a lock file serialises them across processes.
//!
//! No fork+exec while the cut is on: a child gets a (close-on-exec) copy of
//! every open descriptor, and execve() closing the copy of a file with dirty
//! data on the hard mount sends FUSE FLUSH, i.e. a write-back that blocks
//! until the server is back (kernel NFS flushes on every close too). The
//! command lifting the cut would then never start. So a helper shell inside
//! the namespace, started before any mount exists, applies and lifts the
//! cut on request through a pipe.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::{FuseMount, NamedGanesha, StderrLog, ganesha};

const HOST_CIDR: &str = "10.213.77.1/30";
const NS_ADDR: &str = "10.213.77.2";
const NS_CIDR: &str = "10.213.77.2/30";
const NS_PREFIX: &str = "csinfsfuse-netcut-";
/// Host-side veth names are VETH_PREFIX<pid>h, namespace-side VETH_PREFIX<pid>n.
const VETH_PREFIX: &str = "ncut";
const NFT_TABLE: &str = "csinfsfuse_netcut";
const LOCK_FILE: &str = "/run/csi-nfs-fuse-netcut.lock";

/// How long the cut lasts.
const CUT: Duration = Duration::from_secs(12);
/// soft mount: timeo=10 (1 s), retrans=2.
const SOFT_OPTS: &str = "soft,timeo=10,retrans=2,actimeo=0";
const SOFT_BUDGET: Duration = Duration::from_secs(2); // timeo × retrans
const SOFT_SLACK: Duration = Duration::from_secs(3);
const HARD_OPTS: &str = "hard,timeo=10,retrans=2,actimeo=0";
/// After the cut is lifted, hard I/O must complete within this.
const HARD_RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// ... and the soft mount must work again within this.
const SOFT_RECOVERY_LIMIT: Duration = Duration::from_secs(20);
/// Each operation on the healthy mount during the cut.
const HEALTHY_OP_LIMIT: Duration = Duration::from_secs(2);

fn required() -> bool {
    std::env::var("CSI_NFS_FUSE_REQUIRE_GANESHA").as_deref() == Ok("1")
}

/// Runs a command; Err carries its stderr.
fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on its own thread and waits at most `d`. None: still running (the
/// thread stays behind, blocked in the kernel, until the mount goes away).
fn within<T: Send + 'static>(d: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(d).ok()
}

/// A file operation started on its own thread, finishing at some point.
struct Pending<T> {
    rx: mpsc::Receiver<(T, Instant)>,
    _thread: JoinHandle<()>,
}

impl<T: Send + 'static> Pending<T> {
    fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let r = f();
            let _ = tx.send((r, Instant::now()));
        });
        Pending {
            rx,
            _thread: thread,
        }
    }

    fn try_get(&self) -> Option<(T, Instant)> {
        self.rx.try_recv().ok()
    }

    fn wait_until(&self, deadline: Instant) -> Option<(T, Instant)> {
        self.rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }
}

/// Wall-clock time of day in UTC, to line test events up with the mount logs.
fn utc_now() -> String {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let s = d.as_secs() % 86400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Exclusive use of the veth subnet, across processes; released on drop.
struct SubnetLock {
    _file: fs::File,
}

impl SubnetLock {
    fn acquire(limit: Duration) -> Result<SubnetLock, String> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(|e| format!("{LOCK_FILE}: {e}"))?;
        let deadline = Instant::now() + limit;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(SubnetLock { _file: f });
            }
            if Instant::now() > deadline {
                return Err(format!("{LOCK_FILE} still locked after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A shell inside the namespace that runs the `cut` / `lift` commands it
/// reads on stdin and answers one line for each.
struct NetCtl {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    replies: mpsc::Receiver<String>,
}

/// $1: nft table name, $2: the namespace's veth. `cut` drops all IP traffic
/// through that veth, both ways, inside the namespace: silently (no RST, no
/// ICMP); ARP still works, so the host never reports "host unreachable".
const NETCTL_SCRIPT: &str = r#"
table=$1 veth=$2
while read -r cmd; do
    case $cmd in
    cut)
        out=$(nft -f - 2>&1 <<RULES
table inet $table {
  chain pre { type filter hook prerouting priority -300; policy accept; iifname "$veth" drop; }
  chain out { type filter hook output priority -300; policy accept; oifname "$veth" drop; }
}
RULES
        ) ;;
    lift) out=$(nft delete table inet "$table" 2>&1) ;;
    *) out="unknown command '$cmd'"; false ;;
    esac
    if [ $? -eq 0 ]; then echo ok; else echo "error:" $out; fi
done
"#;

/// The server's network namespace and the veth pair to it. Dropping it
/// deletes the pair and the namespace (and with it any cut).
struct NetNs {
    name: String,
    host_veth: String,
    ns_veth: String,
    ctl: std::sync::Mutex<Option<NetCtl>>,
    _lock: SubnetLock,
}

impl NetNs {
    /// Leftovers of a run that died without its guards (we hold the lock,
    /// so whatever uses our names now is stale).
    fn remove_stale() {
        if let Ok(links) = run(&["ip", "-o", "link", "show"]) {
            for l in links.lines() {
                let Some(name) = l.split(": ").nth(1) else {
                    continue;
                };
                let name = name.split('@').next().unwrap_or("");
                if let Some(rest) = name.strip_prefix(VETH_PREFIX)
                    && let Some(digits) = rest.strip_suffix('h')
                    && !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                {
                    eprintln!("netcut: removing stale veth {name}");
                    let _ = run(&["ip", "link", "del", name]);
                }
            }
        }
        if let Ok(list) = run(&["ip", "netns", "list"]) {
            for l in list.lines() {
                let name = l.split_whitespace().next().unwrap_or("");
                if name.starts_with(NS_PREFIX) {
                    eprintln!("netcut: removing stale netns {name}");
                    let _ = run(&["ip", "netns", "del", name]);
                }
            }
        }
        // Their ganesha instances (NamedGanesha names them netcut-<pid>).
        let base = std::env::var("CSI_NFS_FUSE_GANESHA_BASE")
            .unwrap_or_else(|_| "/tmp/csi-nfs-fuse-ganesha".into());
        let script = std::env::var("CSI_NFS_FUSE_GANESHA_SCRIPT")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ganesha.sh").into());
        for e in fs::read_dir(base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name
                .strip_prefix("netcut-")
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                eprintln!("netcut: stopping stale ganesha instance {name}");
                let _ = run(&[&script, "stop", "--name", &name, "--purge"]);
            }
        }
    }

    fn create() -> Result<NetNs, String> {
        let lock = SubnetLock::acquire(Duration::from_secs(180))?;
        Self::remove_stale();
        let pid = std::process::id();
        let ns = NetNs {
            name: format!("{NS_PREFIX}{pid}"),
            host_veth: format!("{VETH_PREFIX}{pid}h"),
            ns_veth: format!("{VETH_PREFIX}{pid}n"),
            ctl: std::sync::Mutex::new(None),
            _lock: lock,
        };
        // From here on, Drop cleans up whatever was made.
        let (n, h, v) = (&ns.name, &ns.host_veth, &ns.ns_veth);
        run(&["ip", "netns", "add", n])?;
        run(&[
            "ip", "link", "add", h, "type", "veth", "peer", "name", v, "netns", n,
        ])?;
        run(&["ip", "addr", "add", HOST_CIDR, "dev", h])?;
        run(&["ip", "link", "set", h, "up"])?;
        ns.exec(&["ip", "addr", "add", NS_CIDR, "dev", v])?;
        ns.exec(&["ip", "link", "set", v, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.start_ctl()?;
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(args);
        run(&a)
    }

    fn start_ctl(&self) -> Result<(), String> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", NETCTL_SCRIPT])
            .args(["netctl", NFT_TABLE, &self.ns_veth])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the netns control shell: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        *self.ctl.lock().unwrap() = Some(NetCtl {
            child,
            stdin,
            replies,
        });
        Ok(())
    }

    /// Sends `cmd` to the control shell and waits (bounded) for its answer.
    /// Starts no process in the test itself.
    fn ctl(&self, cmd: &str) -> Result<(), String> {
        let mut guard = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let ctl = guard.as_mut().ok_or("netns control shell is gone")?;
        ctl.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .and_then(|()| ctl.stdin.flush())
            .map_err(|e| format!("netns control shell: {e}"))?;
        match ctl.replies.recv_timeout(Duration::from_secs(10)) {
            Ok(r) if r == "ok" => Ok(()),
            Ok(r) => Err(format!("{cmd}: {r}")),
            Err(e) => Err(format!(
                "{cmd}: no answer from the netns control shell: {e}"
            )),
        }
    }

    fn cut(&self) -> Result<Cut<'_>, String> {
        self.ctl("cut")?;
        Ok(Cut {
            ns: self,
            active: true,
        })
    }

    fn lift(&self) -> Result<(), String> {
        self.ctl("lift")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(mut ctl) = self.ctl.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = ctl.child.kill();
            let _ = ctl.child.wait();
        }
        // Deleting the host end removes the pair even if some process still
        // pins the namespace; then the namespace itself.
        let _ = run(&["ip", "link", "del", &self.host_veth]);
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("netcut: cleanup: {e}");
        }
    }
}

/// An active cut; lifted on drop.
struct Cut<'a> {
    ns: &'a NetNs,
    active: bool,
}

impl Cut<'_> {
    fn lift(&mut self) -> Result<(), String> {
        self.active = false;
        self.ns.lift()
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if self.active {
            let _ = self.ns.lift();
        }
    }
}

/// false (after printing SKIP, or a panic under scripts/test.sh) when the
/// netns tooling is not usable here.
fn netns_tools_usable() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not root".to_string())
    } else {
        ["ip", "nft", "nsenter"]
            .iter()
            .find_map(|t| {
                run(&["sh", "-c", &format!("command -v {t}")])
                    .err()
                    .map(|_| format!("'{t}' not found"))
            })
            .or_else(|| run(&["ip", "netns", "list"]).err())
    };
    match why {
        None => true,
        Some(why) if required() => panic!(
            "network-cut test required (CSI_NFS_FUSE_REQUIRE_GANESHA=1) but network namespaces are unusable: {why} (scripts/ganesha.sh install provides iproute2 and nftables)"
        ),
        Some(why) => {
            eprintln!("SKIP: network-cut test needs root, ip netns, nft and nsenter: {why}");
            false
        }
    }
}

fn connect_probe(addr: SocketAddr, d: Duration) -> std::io::Result<()> {
    TcpStream::connect_timeout(&addr, d).map(drop)
}

/// Reads and writes files on the healthy mount until `stop`, each operation
/// bounded by HEALTHY_OP_LIMIT. Returns (operations done, slowest op) or the
/// first failure.
fn healthy_loop(dir: std::path::PathBuf, stop: Arc<AtomicBool>) -> Result<(u32, Duration), String> {
    let mut ops = 0u32;
    let mut slowest = Duration::ZERO;
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let name = dir.join(format!("h{}", i % 8));
        let data = format!("healthy {i} {}", "x".repeat((i as usize * 97) % 5000));
        let step = |what: &str, f: Box<dyn FnOnce() -> Result<(), String> + Send>| {
            let t = Instant::now();
            match within(HEALTHY_OP_LIMIT, f) {
                Some(Ok(())) => Ok(t.elapsed()),
                Some(Err(e)) => Err(format!(
                    "healthy mount: {what} #{i} failed after {:?}: {e}",
                    t.elapsed()
                )),
                None => Err(format!(
                    "healthy mount: {what} #{i} took more than {HEALTHY_OP_LIMIT:?}"
                )),
            }
        };
        let (n, d) = (name.clone(), data.clone());
        let t = step(
            "write",
            Box::new(move || fs::write(&n, d.as_bytes()).map_err(|e| e.to_string())),
        )?;
        slowest = slowest.max(t);
        let (n, d) = (name.clone(), data);
        let t = step(
            "read",
            Box::new(move || match fs::read(&n) {
                Ok(got) if got == d.as_bytes() => Ok(()),
                Ok(got) => Err(format!(
                    "read back {} bytes, not the {} written",
                    got.len(),
                    d.len()
                )),
                Err(e) => Err(e.to_string()),
            }),
        )?;
        slowest = slowest.max(t);
        let n = dir.clone();
        let t = step(
            "readdir",
            Box::new(move || {
                fs::read_dir(&n)
                    .map(|r| r.count())
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
        )?;
        slowest = slowest.max(t);
        ops += 3;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((ops, slowest))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
}

#[test]
fn network_cut_hard_blocks_soft_fails_other_mount_unaffected() {
    // The healthy server: the shared default ganesha (skips without it).
    let Some(g0) = ganesha() else { return };
    if !netns_tools_usable() {
        return;
    }
    let ns = NetNs::create().unwrap_or_else(|e| panic!("setting up the network namespace: {e}"));
    let netns_path = format!("/run/netns/{}", ns.name);
    let g = NamedGanesha::start("netcut", &["--netns", &netns_path, "--bind", NS_ADDR])
        .expect("ganesha() was Some");
    let nfs_addr: SocketAddr = format!("{NS_ADDR}:{}", g.nfs_port).parse().unwrap();
    connect_probe(nfs_addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{nfs_addr} unreachable through the veth before any cut: {e}"));

    fs::write(g.export_dir.join("a"), b"first").unwrap();
    fs::write(g.export_dir.join("b"), b"second").unwrap();
    fs::write(g.export_dir.join("c"), b"third").unwrap();
    let source = format!("nfs://{NS_ADDR}{}", g.export_path);
    let ports = format!("port={},mountport={}", g.nfs_port, g.mount_port);
    let mut hard = FuseMount::start(&source, &format!("{ports},{HARD_OPTS}"))
        .unwrap_or_else(|e| panic!("hard mount of {source}: {e}"));
    let hard_log = hard.capture_stderr();
    let mut soft = FuseMount::start(&source, &format!("{ports},{SOFT_OPTS}"))
        .unwrap_or_else(|e| panic!("soft mount of {source}: {e}"));
    let soft_log = soft.capture_stderr();
    let (mut healthy, healthy_server_dir) = g0.fuse_mount("netcut", HARD_OPTS);
    let healthy_log = healthy.capture_stderr();

    let logs = {
        let (h, s, k) = (hard_log.clone(), soft_log.clone(), healthy_log.clone());
        move || {
            format!(
                "\n---- hard mount log ----\n{}---- soft mount log ----\n{}---- healthy mount log ----\n{}",
                h.text(),
                s.text(),
                k.text()
            )
        }
    };
    let pre = |what: &str, r: Option<std::io::Result<Vec<u8>>>, want: &[u8]| match r {
        Some(Ok(v)) if v == want => {}
        other => panic!("before the cut, {what}: {other:?}{}", logs()),
    };
    let (ha, sa) = (hard.path("a"), soft.path("a"));
    pre(
        "hard read a",
        within(Duration::from_secs(10), move || fs::read(ha)),
        b"first",
    );
    pre(
        "soft read a",
        within(Duration::from_secs(10), move || fs::read(sa)),
        b"first",
    );
    // Opened before the cut, used during it.
    let soft_c = fs::File::open(soft.path("c")).unwrap();
    let hard_w = fs::File::create(hard.path("w")).unwrap();
    let payload = pattern(1 << 20);

    // ---------------------------------------------------------------- cut
    let mut cut = ns
        .cut()
        .unwrap_or_else(|e| panic!("cutting the network: {e}"));
    let t_cut = Instant::now();
    eprintln!("netcut: cut at {}", utc_now());
    // Silent: a new connection neither is refused nor fails fast; it times out.
    match connect_probe(nfs_addr, Duration::from_secs(1)) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("the cut is not a silent drop: connect to {nfs_addr} gave {other:?}"),
    }

    let stop = Arc::new(AtomicBool::new(false));
    let healthy_thread = {
        let (dir, stop) = (healthy.dir.clone(), stop.clone());
        std::thread::spawn(move || healthy_loop(dir, stop))
    };
    let hard_reader = {
        let p = hard.path("b");
        Pending::spawn(move || fs::read(p))
    };
    let hard_writer = {
        let (mut f, data) = (hard_w, payload.clone());
        Pending::spawn(move || -> std::io::Result<()> {
            f.write_all(&data)?;
            f.sync_all()?;
            drop(f); // close: flush
            Ok(())
        })
    };

    // soft: operations that need the server fail with EIO within timeo×retrans.
    let soft_limit = SOFT_BUDGET + SOFT_SLACK;
    let mut soft_fail_times = Vec::new();
    type Op = Box<dyn FnOnce() -> std::io::Result<()> + Send>;
    let soft_ops: Vec<(&str, Op)> = vec![
        ("stat b", {
            let p = soft.path("b");
            Box::new(move || fs::metadata(p).map(drop))
        }),
        ("read c (opened before the cut)", {
            let mut f = soft_c;
            // One read(2): read_to_string would fstat first (a GETATTR that
            // times out on its own) and so take two timeouts.
            Box::new(move || {
                let mut buf = [0u8; 64];
                f.read(&mut buf).map(drop)
            })
        }),
        ("create x", {
            let p = soft.path("x");
            Box::new(move || fs::write(p, b"x"))
        }),
    ];
    for (what, op) in soft_ops {
        let t = Instant::now();
        match within(Duration::from_secs(20), op) {
            Some(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                let took = t.elapsed();
                eprintln!("netcut: soft {what}: EIO after {took:?}");
                assert!(
                    took < soft_limit,
                    "soft {what} took {took:?} to fail (timeo×retrans = {SOFT_BUDGET:?}){}",
                    logs()
                );
                soft_fail_times.push((what, took));
            }
            Some(other) => panic!(
                "soft {what} during the cut: {other:?}, expected EIO{}",
                logs()
            ),
            None => panic!("soft {what} still blocked after 20 s of cut{}", logs()),
        }
    }

    // hard: blocked, not failed.
    let t_check = t_cut + Duration::from_secs(4);
    std::thread::sleep(t_check.saturating_duration_since(Instant::now()));
    if let Some((r, at)) = hard_reader.try_get() {
        panic!(
            "hard read finished during the cut after {:?}: {r:?}{}",
            at - t_cut,
            logs()
        );
    }
    if let Some((r, at)) = hard_writer.try_get() {
        panic!(
            "hard write+fsync finished during the cut after {:?}: {r:?}{}",
            at - t_cut,
            logs()
        );
    }
    if healthy_thread.is_finished() {
        panic!(
            "healthy mount failed during the cut: {:?}{}",
            healthy_thread.join(),
            logs()
        );
    }

    // --------------------------------------------------------------- lift
    std::thread::sleep((t_cut + CUT).saturating_duration_since(Instant::now()));
    cut.lift()
        .unwrap_or_else(|e| panic!("lifting the cut: {e}"));
    let t_lift = Instant::now();
    eprintln!("netcut: lifted at {} after {:?}", utc_now(), t_lift - t_cut);
    stop.store(true, Ordering::Relaxed);
    let healthy_result = match within(HEALTHY_OP_LIMIT * 4, move || healthy_thread.join()) {
        Some(Ok(r)) => r,
        Some(Err(_)) => panic!("healthy loop panicked"),
        None => panic!("healthy loop did not stop"),
    };
    let (healthy_ops, healthy_slowest) =
        healthy_result.unwrap_or_else(|e| panic!("isolation broken: {e}{}", logs()));
    connect_probe(nfs_addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{nfs_addr} still unreachable after lifting the cut: {e}"));

    let deadline = t_lift + HARD_RECOVERY_LIMIT;
    let (read, read_at) = hard_reader.wait_until(deadline).unwrap_or_else(|| {
        panic!(
            "hard read did not complete within {HARD_RECOVERY_LIMIT:?} after the cut was lifted{}",
            logs()
        )
    });
    match read {
        Ok(v) if v == b"second" => {}
        other => panic!("hard read after the cut: {other:?}{}", logs()),
    }
    let (written, written_at) = hard_writer.wait_until(deadline).unwrap_or_else(|| {
        panic!(
            "hard write+fsync did not complete within {HARD_RECOVERY_LIMIT:?} after the cut was lifted{}",
            logs()
        )
    });
    written.unwrap_or_else(|e| panic!("hard write+fsync after the cut: {e}{}", logs()));
    let hard_read_recovery = read_at.saturating_duration_since(t_lift);
    let hard_write_recovery = written_at.saturating_duration_since(t_lift);
    // Every byte is on the server.
    let on_server = fs::read(g.export_dir.join("w")).unwrap();
    let lost = payload
        .iter()
        .zip(on_server.iter().chain(std::iter::repeat(&0u8)))
        .filter(|(a, b)| a != b)
        .count()
        + on_server.len().saturating_sub(payload.len());
    assert_eq!(lost, 0, "hard write: {} bytes differ on the server", lost);
    assert_eq!(on_server.len(), payload.len());

    // soft: works again once the server is reachable.
    let mut soft_attempts = Vec::new();
    let soft_recovery = loop {
        let p = soft.path("b");
        let t = Instant::now();
        let r = within(Duration::from_secs(10), move || fs::read(p));
        soft_attempts.push(format!(
            "{:?} after {:?}",
            r.as_ref().map(|r| r.as_ref().map(|v| v.len())),
            t.elapsed()
        ));
        match r {
            Some(Ok(v)) if v == b"second" => break t_lift.elapsed(),
            Some(Ok(v)) => panic!("soft read after the cut returned {v:?}"),
            _ if t_lift.elapsed() > SOFT_RECOVERY_LIMIT => panic!(
                "soft mount still failing {SOFT_RECOVERY_LIMIT:?} after the cut was lifted: {soft_attempts:?}{}",
                logs()
            ),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let sw = soft.path("after");
    match within(Duration::from_secs(10), move || {
        fs::write(sw, b"after the cut")
    }) {
        Some(Ok(())) => {}
        other => panic!("soft write after recovery: {other:?}{}", logs()),
    }
    assert_eq!(
        fs::read(g.export_dir.join("after")).unwrap(),
        b"after the cut"
    );

    let count = |l: &StderrLog, pat: &str| l.lines_with(pat).len();
    eprintln!(
        "netcut: summary: cut {:?}; soft EIO after {:?} (limit {soft_limit:?}); \
         hard read done {hard_read_recovery:?} and hard 1 MiB write+fsync done {hard_write_recovery:?} after the lift \
         (0 bytes lost); soft mount working {soft_recovery:?} after the lift (attempts: {soft_attempts:?}); \
         healthy mount: {healthy_ops} ops during the cut, slowest {healthy_slowest:?}",
        t_lift - t_cut,
        soft_fail_times,
    );
    eprintln!(
        "netcut: hard log: {} 'not responding', {} 'connection lost', {} 'connect failed', {} 'server OK'; \
         soft log: {} 'connection lost', {} 'connect failed'",
        count(&hard_log, "not responding"),
        count(&hard_log, "connection lost"),
        count(&hard_log, "connect failed"),
        count(&hard_log, "server OK"),
        count(&soft_log, "connection lost"),
        count(&soft_log, "connect failed"),
    );
    if std::env::var_os("CSI_NFS_FUSE_NETCUT_LOGS").is_some() {
        eprintln!("{}", logs());
    }

    // Orderly teardown: mounts first (the guards would do the same).
    drop(cut);
    for m in [&mut hard, &mut soft, &mut healthy] {
        let st = m.stop();
        assert!(st.success(), "mount exited with {st}{}", logs());
    }
    let _ = fs::remove_dir_all(healthy_server_dir);
}
