//! The `mount` command's lifecycle: validate, handshake, mount, signal
//! readiness, serve, and on SIGTERM/SIGINT flush, unmount lazily and exit 0.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fuser::{Config, MountOption, SessionACL};
use tracing::{info, warn};

use crate::fs::{FsConfig, NfsFs};
use crate::fuse::FuseAdapter;
use crate::nfs::session;
use crate::options::{MountOptions, NfsSource};
use crate::rpc::{AuthSys, Credential};

pub struct MountRequest {
    pub source: NfsSource,
    pub mountpoint: PathBuf,
    pub options: MountOptions,
    /// Inherited descriptor to write "OK\n" (or an error line) to once the
    /// mount is live, so a supervisor can wait without polling.
    pub ready_fd: Option<i32>,
}

/// Parses and checks everything that can be checked before touching the network.
pub fn prepare(
    source: &str,
    mountpoint: &Path,
    options: &[String],
) -> anyhow::Result<(NfsSource, PathBuf, MountOptions)> {
    let source = NfsSource::parse(source)?;
    let mut opts = MountOptions::default();
    for o in options {
        opts.apply(o)?;
    }
    if let Some(p) = source.port {
        opts.port.get_or_insert(p);
    }
    let md = std::fs::metadata(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    Ok((source, mountpoint.to_path_buf(), opts))
}

fn signal_ready(fd: Option<i32>, msg: &str) {
    if let Some(fd) = fd {
        // SAFETY: the caller handed us this descriptor for our exclusive use
        // (--ready-fd); we take ownership and close it after one write.
        let mut f = unsafe { File::from(OwnedFd::from_raw_fd(fd)) };
        let _ = f.write_all(msg.as_bytes());
    }
}

/// One line for an error and its causes, skipping causes the message
/// already spells out (our error types embed their sources).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

/// Lazily detaches the mount so a busy mountpoint still goes away.
pub fn lazy_unmount(path: &Path) -> nix::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
}

/// Runs a mount in the foreground until it is unmounted or signalled.
pub fn run(req: MountRequest) -> anyhow::Result<()> {
    let result = run_inner(&req);
    if let Err(e) = &result {
        signal_ready(req.ready_fd, &format!("ERR {}\n", describe(e)));
    }
    result
}

fn run_inner(req: &MountRequest) -> anyhow::Result<()> {
    let opts = &req.options;
    // FUSE threads do most of the work themselves (each request's first
    // poll, direct call writes), so the runtime mostly reads replies: one
    // worker per connection. A second worker for one connection only
    // stole tasks and added wake-ups (measured on 2 cores: 4 KiB random
    // reads 2.5 -> 1.9 context switches each, cold sequential read 1.0 ->
    // 0.8 s CPU per GiB, with one worker instead of two).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.nconnect.clamp(1, cores))
        .enable_all()
        .thread_name("nfs-io")
        .build()?;
    let me = AuthSys::current_process();
    let cred = Credential::Sys(AuthSys::new(
        opts.uid.unwrap_or(me.uid),
        opts.gid.unwrap_or(me.gid),
        vec![],
        me.machine_name.clone(),
    ));
    let sess = rt
        .block_on(session::connect(
            &req.source.host,
            &req.source.path,
            &opts.connect_config(),
            &cred,
        ))
        .map_err(anyhow::Error::from)?;
    info!(
        server = %sess.server, export = %sess.export, rsize = sess.rsize, wsize = sess.wsize,
        "NFS export mounted"
    );
    let _rt_guard = rt.enter();
    let fs = NfsFs::new(sess.clone(), FsConfig::from_options(opts));
    let fsname = opts
        .fsname
        .clone()
        .unwrap_or_else(|| format!("{}:{}", req.source.host, req.source.path));
    let mut mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("csi-nfs-fuse".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if opts.read_only {
        mount_options.push(MountOption::RO);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    config.n_threads = Some(opts.fuse_threads);
    config.clone_fd = true;

    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());
    let fuse_closing = adapter.closing();
    let session = fuser::Session::new(adapter, &req.mountpoint, &config)
        .with_context(|| format!("FUSE mount on {}", req.mountpoint.display()))?;
    let bg = session.spawn().context("starting FUSE session")?;
    tune_kernel_readahead(&req.mountpoint);
    info!(mountpoint = %req.mountpoint.display(), "mounted");
    signal_ready(req.ready_fd, "OK\n");

    // Wait for a signal, or for the session to end (external umount).
    let mountpoint = req.mountpoint.clone();
    let ended = Arc::new(tokio::sync::Notify::new());
    let ended2 = ended.clone();
    let watcher = std::thread::spawn(move || {
        let r = bg.join();
        ended2.notify_one();
        r
    });
    let by_signal = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = ended.notified() => false,
        }
    });
    if by_signal {
        info!("signal received: flushing and unmounting");
    } else {
        info!("unmounted externally");
    }
    let flushed =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), fs.flush_all()).await });
    match flushed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "flushing dirty data failed"),
        Err(_) => warn!("flushing dirty data timed out"),
    }
    if by_signal && let Err(e) = lazy_unmount(&mountpoint) {
        warn!(error = %e, "unmount failed");
    }
    // The session ends when the kernel drops the mount. Another mount
    // namespace (a container, a daemon started with unshare) can still hold
    // it after our lazy unmount; don't wait for that forever: exiting closes
    // /dev/fuse, which ends the connection for those holders too.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !watcher.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if watcher.is_finished() {
        let _ = watcher.join();
    } else {
        warn!(
            "the mount is still referenced elsewhere (another mount namespace?); closing the FUSE connection"
        );
    }
    let calls: Vec<String> = sess
        .nfs
        .call_counts()
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    let rpc = sess.nfs.rpc().stats();
    info!(
        calls = %calls.join(" "),
        connects = rpc.connects,
        retransmits = rpc.retransmits,
        "NFS calls made by this mount"
    );
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), sess.unmount(&cred))
            .await
            .ok()
    });
    fuse_closing.store(true, std::sync::atomic::Ordering::Release);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The kernel offers FUSE only 128 KiB of readahead, which caps sequential
/// reads at a few requests in flight. Like the NFS client's read_ahead_kb
/// tuning, raise it through the mount's backing device in sysfs (root only;
/// best effort).
fn tune_kernel_readahead(mountpoint: &Path) {
    const READ_AHEAD_KB: u32 = 1024;
    let Ok(st) = nix::sys::stat::stat(mountpoint) else {
        return;
    };
    let (major, minor) = (
        nix::sys::stat::major(st.st_dev),
        nix::sys::stat::minor(st.st_dev),
    );
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "could not raise kernel readahead");
    }
}

/// Forks; the parent waits for the child's readiness line and exits with
/// its verdict, so `mount` returns only once the mount is live.
pub fn daemonize_and_run(mut req: MountRequest) -> anyhow::Result<()> {
    let (rd, wr) = nix::unistd::pipe()?;
    // SAFETY: called before any thread or runtime exists, so the child is a
    // faithful copy with nothing half-locked.
    match unsafe { nix::unistd::fork()? } {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            let mut line = String::new();
            let mut f = File::from(rd);
            let _ = std::io::Read::read_to_string(&mut f, &mut line);
            if let Some(parent_fd) = req.ready_fd {
                signal_ready(Some(parent_fd), &line);
            }
            match line.trim_end() {
                "OK" => Ok(()),
                "" => bail!("mount process exited before the mount was ready"),
                other => bail!("{}", other.trim_start_matches("ERR ")),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let _ = nix::unistd::setsid();
            let _ = std::env::set_current_dir("/");
            // Like mount.nfs, a helper leaves the terminal alone once it
            // returns; `-o debug` keeps the log on stderr for troubleshooting.
            if !req.options.debug
                && let Ok(null) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                // SAFETY: dup2 onto the standard descriptors we own; no
                // other thread exists yet.
                unsafe {
                    libc::dup2(null.as_raw_fd(), 0);
                    libc::dup2(null.as_raw_fd(), 1);
                    libc::dup2(null.as_raw_fd(), 2);
                }
            }
            req.ready_fd = Some(std::os::fd::IntoRawFd::into_raw_fd(wr));
            // Errors reach the parent through the readiness pipe.
            let code = if run(req).is_ok() { 0 } else { 1 };
            std::process::exit(code);
        }
    }
}
