//! The CSI test harness: the real `csi-nfs-fuse plugin` binary on a unix
//! socket, a tonic client, and helpers shared by the tests/csi_*.rs files.
#![allow(dead_code, unused_imports)]

pub use std::collections::HashMap;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Stdio};
pub use std::time::{Duration, Instant};

pub use crate::common::*;
pub use csi_nfs_fuse::csi::proto::controller_client::ControllerClient;
pub use csi_nfs_fuse::csi::proto::identity_client::IdentityClient;
pub use csi_nfs_fuse::csi::proto::node_client::NodeClient;
pub use csi_nfs_fuse::csi::proto::volume_capability::access_mode::Mode;
pub use csi_nfs_fuse::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
pub use csi_nfs_fuse::csi::proto::*;
pub use csi_nfs_fuse::csi::volume_id::{OnDelete, VolumeRef};
use hyper_util::rt::TokioIo;
pub use nix::sys::signal::{Signal, kill};
pub use nix::unistd::Pid;
use tokio::net::UnixStream;
pub use tonic::transport::Channel;
use tonic::transport::{Endpoint, Uri};
pub use tonic::{Code, Status};

pub const SECRET: &str = "hunter2-do-not-log-me";

/// A running `csi-nfs-fuse plugin` and a gRPC channel to it.
pub struct Plugin {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub channel: Channel,
    pub dir: tempfile::TempDir,
}

pub async fn connect(sock: &Path) -> Result<Channel, tonic::transport::Error> {
    let sock = sock.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(sock).await?)) }
        }))
        .await
}

impl Plugin {
    pub async fn start(extra: &[&str]) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run").join("csi.sock");
        Self::start_at(dir, sock, extra).await
    }

    /// Starts the plugin with the log filter `CSI_NFS_FUSE_LOG=filter`.
    pub async fn start_logged(extra: &[&str], filter: &str) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run").join("csi.sock");
        Self::start_with(dir, sock, extra, &[("CSI_NFS_FUSE_LOG", filter)]).await
    }

    /// Starts the plugin on `sock` and waits (at most 1 s) until it answers.
    pub async fn start_at(dir: tempfile::TempDir, sock: PathBuf, extra: &[&str]) -> Plugin {
        Self::start_with(dir, sock, extra, &[]).await
    }

    /// Starts the plugin with extra arguments and environment variables
    /// (`CSI_NFS_FUSE_LOG` is `info` unless given).
    pub async fn start_with(
        dir: tempfile::TempDir,
        sock: PathBuf,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Plugin {
        let log = dir.path().join(format!("plugin-{}.log", rand_suffix()));
        let logf = std::fs::File::create(&log).unwrap();
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
            .arg("plugin")
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .arg("--node-id")
            .arg("test-node")
            .args(extra)
            .env("CSI_NFS_FUSE_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let channel = loop {
            if let Ok(ch) = connect(&sock).await {
                let mut id = IdentityClient::new(ch.clone());
                if id.get_plugin_info(GetPluginInfoRequest {}).await.is_ok() {
                    break ch;
                }
            }
            if started.elapsed() > Duration::from_secs(1) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "plugin not answering on {} within 1 s; log:\n{}",
                    sock.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Plugin {
            child: Some(child),
            sock,
            log,
            channel,
            dir,
        }
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A target path under this plugin's temp dir (not created).
    pub fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join("published").join(name)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("plugin did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: its mount children stay behind.
    pub fn crash(&mut self) -> tempfile::TempDir {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        // Never let TempDir's recursive removal walk into a leftover mount
        // (it would delete files on the server).
        for m in mount_points() {
            if Path::new(&m).starts_with(self.dir.path()) {
                let _ = nix::mount::umount2(Path::new(&m), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn kv(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ganesha_params(g: &Ganesha, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut p = kv(&[("server", &g.host), ("share", &g.export)]);
    p.extend(kv(extra));
    p
}

/// A volume `vol` on a named ganesha that gives up fast when it is gone
/// (soft, 1 s, one retransmission), for tests that stop that server.
pub fn soft_named_params(g: &NamedGanesha) -> HashMap<String, String> {
    let opts = format!("{},soft,timeo=10,retrans=1", g.mount_opts());
    kv(&[
        ("server", "127.0.0.1"),
        ("share", &g.export_path),
        ("subDir", "vol"),
        ("mountOptions", &opts),
    ])
}

pub fn create_req(name: &str, params: HashMap<String, String>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 0,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        parameters: params,
        secrets: kv(&[("password", SECRET)]),
        accessibility_requirements: Some(TopologyRequirement::default()),
        ..Default::default()
    }
}

pub async fn create(
    p: &Plugin,
    name: &str,
    params: HashMap<String, String>,
) -> Result<Volume, Status> {
    p.controller()
        .create_volume(create_req(name, params))
        .await
        .map(|r| r.into_inner().volume.expect("volume in response"))
}

pub async fn delete(p: &Plugin, id: &str) -> Result<(), Status> {
    p.controller()
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: kv(&[("password", SECRET)]),
        })
        .await
        .map(|_| ())
}

pub fn publish_req(vol: &Volume, target: &Path, readonly: bool) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        readonly,
        secrets: kv(&[("password", SECRET)]),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

pub async fn publish(
    p: &Plugin,
    vol: &Volume,
    target: &Path,
    readonly: bool,
) -> Result<(), Status> {
    p.node()
        .node_publish_volume(publish_req(vol, target, readonly))
        .await
        .map(|_| ())
}

pub async fn unpublish(p: &Plugin, id: &str, target: &Path) -> Result<(), Status> {
    p.node()
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.to_string_lossy().into_owned(),
        })
        .await
        .map(|_| ())
}

pub async fn stats(p: &Plugin, id: &str, path: &str) -> Result<NodeGetVolumeStatsResponse, Status> {
    p.node()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            staging_target_path: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn validate(
    p: &Plugin,
    id: &str,
    caps: Vec<VolumeCapability>,
) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
    p.controller()
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "message '{}' lacks '{needle}'",
                s.message()
            );
        }
    }
}

pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

pub fn is_mounted(target: &Path) -> bool {
    mount_points().iter().any(|m| Path::new(m) == target)
}

/// Pids of `csi-nfs-fuse mount ... TARGET` processes.
pub fn mount_pids(target: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Only our own processes: reading /proc/PID/{cmdline,stat} of an
        // unrelated process stuck on a hung mount (other tests cut servers
        // off) can block; /proc/PID/comm never does.
        match std::fs::read_to_string(ent.path().join("comm")) {
            Ok(comm) if comm.trim_end() == "csi-nfs-fuse" => {}
            _ => continue,
        }
        let Ok(raw) = std::fs::read(ent.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let zombie = std::fs::read_to_string(ent.path().join("stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if args.len() > 3
            && args[1] == b"mount"
            && Path::new(std::str::from_utf8(args[3]).unwrap_or("")) == target
            && !zombie
        {
            out.push(pid);
        }
    }
    out
}

pub fn one_mount_pid(target: &Path) -> i32 {
    let pids = mount_pids(target);
    assert_eq!(
        pids.len(),
        1,
        "mount processes for {}: {pids:?}",
        target.display()
    );
    pids[0]
}

/// Polls `f` (in a thread, as file access may block) until true or `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Runs blocking file I/O with a time limit, so a hung mount fails the test.
pub async fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    tokio::time::timeout(limit, tokio::task::spawn_blocking(f))
        .await
        .expect("file operation hung")
        .unwrap()
}

pub fn unique(tag: &str) -> String {
    format!("csi-{tag}-{}-{}", std::process::id(), rand_suffix())
}

/// Fields of /proc/PID/status (`Name:\tvalue`).
pub fn proc_status(pid: i32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Resident set size in KiB (VmRSS).
pub fn rss_kib(pid: i32) -> u64 {
    proc_status(pid)
        .get("VmRSS")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Socket inodes among a process's open descriptors, without duplicates.
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(link) = std::fs::read_link(ent.path()) {
            let l = link.to_string_lossy();
            if let Some(ino) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                out.push(ino.parse().unwrap());
            }
        }
    }
    // A process may hold one socket under several descriptors.
    out.sort_unstable();
    out.dedup();
    out
}

/// A TCP socket from /proc/PID/net/tcp{,6}.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConn {
    pub local_port: u16,
    pub remote_port: u16,
    /// 01 is ESTABLISHED.
    pub state: u8,
    pub inode: u64,
}

/// The TCP sockets a process holds open (matched by inode).
pub fn tcp_conns(pid: i32) -> Vec<TcpConn> {
    let mine = socket_inodes(pid);
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
            let inode: u64 = f[9].parse().unwrap_or(0);
            if inode != 0 && mine.binary_search(&inode).is_ok() {
                out.push(TcpConn {
                    local_port: port(f[1]),
                    remote_port: port(f[2]),
                    state: u8::from_str_radix(f[3], 16).unwrap(),
                    inode,
                });
            }
        }
    }
    out
}
