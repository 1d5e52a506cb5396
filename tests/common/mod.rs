//! Shared test helpers: an in-process nfs3_server and the ganesha harness.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use csi_nfs_fuse::nfs::{ConnectConfig, NfsSession};
use csi_nfs_fuse::rpc::{AuthSys, Credential, RpcConfig};
use nfs3_server::memfs::{MemFs, MemFsConfig};
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};

pub fn root_cred() -> Credential {
    Credential::Sys(AuthSys::new(0, 0, vec![], "csi-nfs-fuse-test".into()))
}

/// Starts nfs3_server's in-memory filesystem on 127.0.0.1 and returns its port.
/// It serves portmap, MOUNT and NFS on that one port, answering out of order.
pub async fn start_memfs(config: MemFsConfig) -> u16 {
    let fs = MemFs::new(config).expect("memfs");
    let listener = NFSTcpListener::bind("127.0.0.1:0", fs)
        .await
        .expect("bind memfs");
    let port = listener.get_listen_port();
    tokio::spawn(async move {
        let _ = listener.handle_forever().await;
    });
    port
}

pub fn memfs_config(port: u16, rpc: RpcConfig) -> ConnectConfig {
    ConnectConfig {
        rpc,
        port: Some(port),
        mountport: Some(port),
        handshake_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

pub async fn mount_memfs(port: u16, rpc: RpcConfig) -> NfsSession {
    csi_nfs_fuse::nfs::session::connect("127.0.0.1", "/", &memfs_config(port, rpc), &root_cred())
        .await
        .expect("mount memfs")
}

/// The ganesha export started by `scripts/ganesha.sh` (via scripts/test.sh).
pub struct Ganesha {
    pub host: String,
    /// Path clients mount.
    pub export: String,
    /// The exported directory on this machine.
    pub dir: PathBuf,
    /// NFS and MOUNT ports (scripts/test.sh's, else the default instance's).
    pub nfs_port: u16,
    pub mount_port: u16,
}

/// Returns the ganesha export, or `None` (printing SKIP) when it is not
/// running. Under scripts/test.sh (CSI_NFS_FUSE_REQUIRE_GANESHA=1) a missing
/// server is a failure, so CI cannot pass by skipping.
pub fn ganesha() -> Option<Ganesha> {
    match (
        std::env::var("CSI_NFS_FUSE_GANESHA_EXPORT"),
        std::env::var("CSI_NFS_FUSE_GANESHA_DIR"),
    ) {
        (Ok(export), Ok(dir)) => {
            let port = |var: &str, default: u16| {
                std::env::var(var)
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(default)
            };
            Some(Ganesha {
                host: std::env::var("CSI_NFS_FUSE_GANESHA_HOST")
                    .unwrap_or_else(|_| "127.0.0.1".into()),
                export,
                dir: dir.into(),
                nfs_port: port("CSI_NFS_FUSE_GANESHA_NFS_PORT", 2049),
                mount_port: port("CSI_NFS_FUSE_GANESHA_MOUNT_PORT", 20048),
            })
        }
        _ => {
            if std::env::var("CSI_NFS_FUSE_REQUIRE_GANESHA").as_deref() == Ok("1") {
                panic!(
                    "ganesha is required (CSI_NFS_FUSE_REQUIRE_GANESHA=1) but CSI_NFS_FUSE_GANESHA_EXPORT/DIR are not set"
                );
            }
            eprintln!("SKIP: ganesha not running; run scripts/test.sh for the real-server tests");
            None
        }
    }
}

impl Ganesha {
    /// A fresh directory inside the export for one test, so tests can run
    /// side by side. Returns (path on disk, path relative to the export root).
    pub fn test_dir(&self, name: &str) -> (PathBuf, String) {
        let rel = format!("t-{name}-{}", std::process::id());
        let p = self.dir.join(&rel);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        // ganesha exports with root squash off; make it writable for any uid anyway.
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        (p, rel)
    }

    pub async fn mount(&self, rpc: RpcConfig) -> NfsSession {
        let cfg = ConnectConfig {
            rpc,
            handshake_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        csi_nfs_fuse::nfs::session::connect(&self.host, &self.export, &cfg, &root_cred())
            .await
            .expect("mount ganesha export")
    }
}

/// A live `csi-nfs-fuse mount` child process on a temp mountpoint.
pub struct FuseMount {
    pub dir: PathBuf,
    child: Option<std::process::Child>,
    _tmp: tempfile::TempDir,
}

impl FuseMount {
    /// Mounts `source` with options `-o opts`; waits for the readiness line.
    pub fn start(source: &str, opts: &str) -> Result<FuseMount, String> {
        use std::io::Read;
        use std::os::fd::{AsRawFd, OwnedFd};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        // Close-on-exec, cleared in our child alone: a mount another test
        // starts at the same moment must not inherit this write end, or
        // each test waits for EOF on a pipe the other's child holds open.
        let (rd, wr): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let wr_fd = wr.as_raw_fd();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"));
        cmd.arg("mount")
            .arg(source)
            .arg(&dir)
            .arg("--ready-fd")
            .arg(wr_fd.to_string());
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts);
        }
        cmd.stderr(std::process::Stdio::piped());
        // SAFETY: runs in the forked child before exec; fcntl is
        // async-signal-safe and nothing allocates.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::fcntl(wr_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| e.to_string())?;
        drop(wr);
        let mut line = String::new();
        let _ = std::fs::File::from(rd).read_to_string(&mut line);
        let mut m = FuseMount {
            dir,
            child: Some(child),
            _tmp: tmp,
        };
        if line.trim() == "OK" {
            Ok(m)
        } else {
            let mut child = m.child.take().unwrap();
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            Err(format!("{}{}", line, String::from_utf8_lossy(&out.stderr)))
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then the exit status and everything the process logged.
    pub fn stop_with_log(&mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let mut stderr = self.child.as_mut().and_then(|c| c.stderr.take());
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut out);
            }
            out
        });
        let st = self.stop();
        (st, reader.join().unwrap_or_default())
    }

    /// SIGTERM: flush, unmount, exit 0. Returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
                panic!("mount process did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..500 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// What a mount process wrote to stderr (its log), collected by a thread.
#[derive(Clone, Default)]
pub struct StderrLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl StderrLog {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines logged so far that contain `pat`.
    pub fn lines_with(&self, pat: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(pat))
            .map(str::to_owned)
            .collect()
    }
}

impl FuseMount {
    /// Starts draining the mount process's stderr into a buffer in the
    /// background (so a chatty mount never blocks on a full pipe) and returns
    /// a handle to read it at any time. Call once, right after `start`.
    pub fn capture_stderr(&mut self) -> StderrLog {
        use std::io::Read;
        let mut stderr = self
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("mount stderr not captured yet");
        let log = StderrLog::default();
        let buf = log.0.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        log
    }
}

impl Ganesha {
    /// Mounts a fresh per-test subdirectory of the export through FUSE.
    pub fn fuse_mount(&self, name: &str, opts: &str) -> (FuseMount, PathBuf) {
        let (dir, rel) = self.test_dir(name);
        let src = format!("nfs://{}{}/{}", self.host, self.export, rel);
        let m = FuseMount::start(&src, opts).unwrap_or_else(|e| panic!("mount {src}: {e}"));
        (m, dir)
    }

    pub fn source(&self, rel: &str) -> String {
        format!("nfs://{}{}/{}", self.host, self.export, rel)
    }
}

/// A private ganesha instance (own ports, own export) that a test may kill
/// and restart without disturbing the shared one. Stopped and purged on drop.
pub struct NamedGanesha {
    pub name: String,
    pub export_dir: PathBuf,
    pub export_path: String,
    pub nfs_port: u16,
    pub mount_port: u16,
}

fn ganesha_script() -> String {
    std::env::var("CSI_NFS_FUSE_GANESHA_SCRIPT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ganesha.sh").into())
}

fn run_script(args: &[&str]) -> String {
    let out = std::process::Command::new(ganesha_script())
        .args(args)
        .output()
        .expect("run ganesha.sh");
    assert!(
        out.status.success(),
        "ganesha.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl NamedGanesha {
    /// Starts instance `name` when the real-server tests are enabled.
    pub fn start(name: &str, extra: &[&str]) -> Option<NamedGanesha> {
        ganesha()?;
        let name = format!("{name}-{}", std::process::id());
        let mut args = vec!["start", "--name", &name];
        args.extend_from_slice(extra);
        let out = run_script(&args);
        let get = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(|v| v.trim_matches('\'').to_string())
                .unwrap_or_else(|| panic!("ganesha.sh start printed no {k}: {out}"))
        };
        Some(NamedGanesha {
            export_dir: get("export_dir").into(),
            export_path: get("export_path"),
            nfs_port: get("nfs_port").parse().unwrap(),
            mount_port: get("mount_port").parse().unwrap(),
            name,
        })
    }

    pub fn kill(&self) {
        run_script(&["kill", "--name", &self.name]);
    }

    pub fn restart(&self) {
        run_script(&["restart", "--name", &self.name]);
    }

    pub fn stop(&self) {
        run_script(&["stop", "--name", &self.name]);
    }

    pub fn connect_config(&self, rpc: RpcConfig) -> ConnectConfig {
        ConnectConfig {
            rpc,
            port: Some(self.nfs_port),
            mountport: Some(self.mount_port),
            handshake_timeout: Duration::from_secs(10),
            ..Default::default()
        }
    }

    pub async fn mount(&self, rpc: RpcConfig) -> NfsSession {
        csi_nfs_fuse::nfs::session::connect(
            "127.0.0.1",
            &self.export_path,
            &self.connect_config(rpc),
            &root_cred(),
        )
        .await
        .expect("mount named ganesha")
    }

    /// `-o` options that point a FUSE mount at this instance.
    pub fn mount_opts(&self) -> String {
        format!("port={},mountport={}", self.nfs_port, self.mount_port)
    }

    pub fn source(&self) -> String {
        format!("nfs://127.0.0.1{}", self.export_path)
    }
}

impl Drop for NamedGanesha {
    fn drop(&mut self) {
        let _ = std::process::Command::new(ganesha_script())
            .args(["stop", "--name", &self.name, "--purge"])
            .output();
    }
}

/// Bytes from a seeded xorshift: different seeds give different data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One 4 KiB block aligned for O_DIRECT.
#[derive(Clone)]
#[repr(align(4096))]
pub struct Block(pub [u8; 4096]);

impl Block {
    pub fn pattern(seed: u64) -> Block {
        let mut block = Block([0; 4096]);
        block.0.copy_from_slice(&pattern(seed, 4096));
        block
    }
}

pub fn open_direct_writer(path: PathBuf) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}
