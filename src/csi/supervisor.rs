//! One `csi-nfs-fuse mount` child process per published target path.
//!
//! Each mount is its own process with its own NFS connections and
//! credentials, so a dead server hangs only its own volumes. The supervisor
//! starts a child, waits for its readiness line (`OK` or `ERR reason` on an
//! inherited pipe, see `crate::mount`), keeps `target → child`, restarts a
//! child that dies unexpectedly (after lazily detaching its dead FUSE mount)
//! and stops children with SIGTERM, which makes them flush and unmount.
//!
//! Children of an earlier plugin process that are still serving (the plugin
//! was killed, not stopped) are found by their command line and adopted when
//! they serve exactly the requested mount.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{debug, error, info, warn};

use super::InFlight;
use super::errors;

/// Longest wait for a child's readiness line (Swarm allows 15 s per publish).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERMed child may take to flush and exit before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(12);
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(200);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A child that ran this long before dying restarts without backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(500);

/// What a target path is published with; equal specs are the same publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub volume_id: String,
    /// `nfs://SERVER/SHARE/SUBDIR`.
    pub source: String,
    /// The complete `-o` list.
    pub options: String,
}

impl MountSpec {
    fn args(&self, target: &Path) -> Vec<String> {
        vec![
            "mount".into(),
            self.source.clone(),
            target.to_string_lossy().into_owned(),
            "-o".into(),
            self.options.clone(),
        ]
    }
}

enum State {
    Running {
        pid: Pid,
        generation: u64,
        started: Instant,
        /// Becomes `Some(description)` when the process has exited.
        exited: watch::Receiver<Option<String>>,
    },
    Dead {
        reason: String,
        retry_at: Instant,
    },
}

struct Entry {
    spec: MountSpec,
    state: State,
    /// Consecutive quick deaths, for the restart backoff.
    failures: u32,
}

enum Event {
    Exited {
        target: PathBuf,
        generation: u64,
        how: String,
    },
}

pub struct Supervisor {
    exe: PathBuf,
    entries: Mutex<HashMap<PathBuf, Entry>>,
    in_flight: InFlight,
    events: mpsc::UnboundedSender<Event>,
    generation: AtomicU64,
}

/// How a process ended, for the log.
pub fn describe_exit(st: &ExitStatus) -> String {
    if let Some(sig) = st.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        format!(
            "killed by signal {sig} ({name}){}",
            if st.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        )
    } else {
        match st.code() {
            Some(0) => "exited with status 0 (unmounted from outside?)".into(),
            Some(c) => format!("exited with status {c}"),
            None => format!("ended ({st})"),
        }
    }
}

/// Mount points of this mount namespace, from /proc/self/mountinfo.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path as mountinfo shows it: the parent resolved, the name kept (so a
/// dead FUSE mount on the target itself is never stat'ed).
pub fn canonical_target(target: &Path) -> PathBuf {
    match (target.parent(), target.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| target.to_path_buf()),
        _ => target.to_path_buf(),
    }
}

pub fn is_mount_point(target: &Path) -> bool {
    let t = canonical_target(target);
    mount_points().contains(&t)
}

/// What is at a target path that the supervisor does not track.
#[derive(Debug, PartialEq, Eq)]
pub enum TargetState {
    NotMounted,
    /// A mount whose FUSE server is gone (ENOTCONN).
    Stale,
    Live,
    /// stat did not answer in time: a live mount whose server hangs.
    Hung,
}

/// Stats the target in a helper thread, so a hung mount cannot block us.
pub async fn probe_target(target: &Path) -> TargetState {
    if !is_mount_point(target) {
        return TargetState::NotMounted;
    }
    let t = target.to_path_buf();
    let stat = tokio::task::spawn_blocking(move || std::fs::metadata(&t));
    match tokio::time::timeout(Duration::from_secs(2), stat).await {
        Ok(Ok(Ok(_))) => TargetState::Live,
        Ok(Ok(Err(e))) if e.raw_os_error() == Some(libc::ENOTCONN) => TargetState::Stale,
        Ok(Ok(Err(e))) => {
            debug!(target = %target.display(), error = %e, "stat of mounted target failed");
            TargetState::Stale
        }
        Ok(Err(_)) => TargetState::Stale,
        Err(_) => TargetState::Hung,
    }
}

/// Detaches whatever is mounted on `target` (lazily, so a busy or dead
/// mount still goes); a target that is not a mount point is fine.
pub fn detach(target: &Path) -> Result<(), Status> {
    for _ in 0..8 {
        if !is_mount_point(target) {
            return Ok(());
        }
        match crate::mount::lazy_unmount(target) {
            Ok(()) => info!(target = %target.display(), "detached mount"),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(errors::internal(format!(
                    "unmounting {}: {e}",
                    target.display()
                )));
            }
        }
    }
    Ok(())
}

/// Processes running `<exe> mount SOURCE TARGET -o OPTIONS` for `target`,
/// with their arguments (after the executable).
fn mount_processes(exe: &Path, target: &Path) -> Vec<(Pid, Vec<String>)> {
    let exe_name = exe.file_name().map(|n| n.to_os_string());
    // The kernel's task name: the executable's file name, cut to 15 bytes.
    let comm: Vec<u8> = exe_name
        .as_ref()
        .map(|n| n.as_encoded_bytes().iter().copied().take(15).collect())
        .unwrap_or_default();
    let targets = [target.to_path_buf(), canonical_target(target)];
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ent in dir.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        // Look at the name first: reading the cmdline (or stat) of an
        // unrelated process that is stuck on a hung mount elsewhere on the
        // node can block, and this runs in NodePublish/NodeUnpublish.
        // /proc/PID/comm never blocks.
        match std::fs::read(ent.path().join("comm")) {
            Ok(c) if c.strip_suffix(b"\n").unwrap_or(&c) == comm.as_slice() => {}
            _ => continue,
        }
        let Ok(raw) = std::fs::read(ent.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.len() < 4 || args[1] != "mount" {
            continue;
        }
        if Path::new(&args[0]).file_name().map(|n| n.to_os_string()) != exe_name {
            continue;
        }
        if !targets.iter().any(|t| Path::new(&args[3]) == t) {
            continue;
        }
        if process_gone(Pid::from_raw(pid)) {
            continue;
        }
        out.push((Pid::from_raw(pid), args[1..].to_vec()));
    }
    out
}

/// True if the process no longer exists or is a zombie.
fn process_gone(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// `CAP_NET_BIND_SERVICE`: reserved source ports (`resvport`, the default
/// as root) for the NFS, MOUNT and portmap connections, also on reconnects.
pub const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_SYS_ADMIN`: mount(2) of the FUSE filesystem, and umount2(2) of it
/// when the child is stopped (SIGTERM: flush, then a lazy unmount).
pub const CAP_SYS_ADMIN: u32 = 21;
/// The only capabilities a mount child keeps. Everything else the plugin
/// may hold (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_SETUID, CAP_SYS_PTRACE, ...)
/// is of no use to a process that speaks NFS over TCP and FUSE over an
/// already opened /dev/fuse, so a compromised child cannot use it.
pub const CHILD_CAPABILITIES: [u32; 2] = [CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN];

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
        .min(63)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Runs in the forked child before exec (async-signal-safe calls only).
///
/// A root process gets its bounding set as permitted and effective set at
/// exec, so dropping every other capability from the bounding set (needs
/// CAP_SETPCAP, which the plugin has as root and in Docker's default set)
/// leaves the child exactly [`CHILD_CAPABILITIES`]; the inheritable and
/// ambient sets are emptied so nothing comes back through them, and
/// no_new_privs stops a set-uid or file-capability program from regaining
/// any. Best effort: a plugin without CAP_SETPCAP (not root) starts the
/// child as it is, which then has no more than the plugin.
fn restrict_capabilities(last_cap: u32) {
    // SAFETY: plain syscalls on this process with valid pointers.
    unsafe {
        for cap in 0..=last_cap {
            if !CHILD_CAPABILITIES.contains(&cap) {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        ) == 0
        {
            data[0].inheritable = 0;
            data[1].inheritable = 0;
            libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr());
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
}

fn restart_delay(failures: u32) -> Duration {
    FIRST_RESTART_DELAY
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_RESTART_DELAY)
}

impl Supervisor {
    /// Creates the supervisor and starts its restart loop on the current runtime.
    pub fn start(exe: PathBuf) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sup = Arc::new(Self {
            exe,
            entries: Mutex::new(HashMap::new()),
            in_flight: InFlight::default(),
            events: tx,
            generation: AtomicU64::new(1),
        });
        tokio::spawn(Self::restart_loop(Arc::downgrade(&sup), rx));
        sup
    }

    fn lock_target(&self, target: &Path) -> Result<super::InFlightGuard, Status> {
        self.in_flight
            .try_lock(&target.to_string_lossy())
            .ok_or_else(|| errors::aborted(&format!("target {}", target.display())))
    }

    /// Whether `target` is published (by this plugin) for `volume_id`.
    pub fn is_published(&self, target: &Path, volume_id: &str) -> bool {
        self.entries
            .lock()
            .get(target)
            .is_some_and(|e| e.spec.volume_id == volume_id)
    }

    /// The pid serving `target`, if running (for tests and logs).
    pub fn pid(&self, target: &Path) -> Option<Pid> {
        match self.entries.lock().get(target).map(|e| &e.state) {
            Some(State::Running { pid, .. }) => Some(*pid),
            _ => None,
        }
    }

    /// Makes `target` serve `spec`: OK if it already does, ALREADY_EXISTS if
    /// it serves something else, and a fresh child otherwise (after cleaning
    /// up a stale mount).
    pub async fn publish(&self, target: &Path, spec: MountSpec) -> Result<(), Status> {
        let _guard = self.lock_target(target)?;
        let tracked = self.entries.lock().get(target).map(|e| {
            let running = match &e.state {
                State::Running { pid, exited, .. } if exited.borrow().is_none() => {
                    // A just-killed child may not be reaped yet: ask /proc.
                    (!process_gone(*pid)).then(|| (*pid, exited.clone()))
                }
                _ => None,
            };
            (e.spec.clone(), running)
        });
        match tracked {
            Some((existing, _)) if existing != spec => {
                return Err(Status::already_exists(format!(
                    "target {} is already published with different arguments (volume {})",
                    target.display(),
                    existing.volume_id
                )));
            }
            Some((_, Some((pid, exited)))) => {
                if is_mount_point(target) {
                    debug!(target = %target.display(), "already published");
                    return Ok(());
                }
                // Unmounted behind our back while the child lives on.
                warn!(target = %target.display(), pid = pid.as_raw(), "mount is gone but its process runs; replacing it");
                self.entries.lock().remove(target);
                stop_pid(pid, Some(exited)).await;
                detach(target)?;
            }
            Some((_, None)) => {
                // As in the restart loop: the dead mount (ENOTCONN on every
                // access) stays until the server answers.
                server_answers(&spec).await?;
                info!(target = %target.display(), "mount process is gone; remounting");
                detach(target)?;
            }
            None => match probe_target(target).await {
                TargetState::NotMounted => {}
                TargetState::Stale => {
                    info!(target = %target.display(), "stale mount on target; detaching and remounting");
                    self.kill_orphans(target).await;
                    detach(target)?;
                }
                TargetState::Live | TargetState::Hung => {
                    return self.adopt(target, spec);
                }
            },
        }
        self.spawn_into(target, spec, 0).await
    }

    /// A live mount we do not track: adopt it if a mount process of ours
    /// serves exactly this spec (the plugin was restarted under it).
    fn adopt(&self, target: &Path, spec: MountSpec) -> Result<(), Status> {
        let want = spec.args(target);
        let procs = mount_processes(&self.exe, target);
        let found = procs.iter().find(|(_, args)| {
            args.len() >= want.len()
                && args[..want.len()]
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .all(|(i, (a, b))| i == 2 || a == b)
        });
        let Some((pid, _)) = found else {
            return Err(Status::already_exists(format!(
                "target {} is already a mount point{}",
                target.display(),
                if procs.is_empty() {
                    " not managed by this plugin"
                } else {
                    " with different arguments"
                }
            )));
        };
        let pid = *pid;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let events = self.events.clone();
        let t = target.to_path_buf();
        tokio::spawn(async move {
            while !process_gone(pid) {
                tokio::time::sleep(POLL).await;
            }
            let how = "adopted mount process exited (status unknown)".to_string();
            let _ = tx.send(Some(how.clone()));
            let _ = events.send(Event::Exited {
                target: t,
                generation,
                how,
            });
        });
        info!(target = %target.display(), pid = pid.as_raw(), "adopted running mount process");
        self.entries.lock().insert(
            target.to_path_buf(),
            Entry {
                spec,
                state: State::Running {
                    pid,
                    generation,
                    started: Instant::now(),
                    exited: rx,
                },
                failures: 0,
            },
        );
        Ok(())
    }

    /// Spawns a child for `target` and records it (running, or dead with the
    /// reason so the restart loop retries if this was a restart).
    async fn spawn_into(
        &self,
        target: &Path,
        spec: MountSpec,
        failures: u32,
    ) -> Result<(), Status> {
        match self.spawn(target, &spec).await {
            Ok(state) => {
                self.entries.lock().insert(
                    target.to_path_buf(),
                    Entry {
                        spec,
                        state,
                        failures,
                    },
                );
                Ok(())
            }
            Err(e) => {
                if failures > 0 {
                    // A failed restart: keep the entry so we try again later.
                    self.entries.lock().insert(
                        target.to_path_buf(),
                        Entry {
                            spec,
                            state: State::Dead {
                                reason: e.message().to_string(),
                                retry_at: Instant::now() + restart_delay(failures),
                            },
                            failures: failures + 1,
                        },
                    );
                }
                Err(e)
            }
        }
    }

    async fn spawn(&self, target: &Path, spec: &MountSpec) -> Result<State, Status> {
        let (rd, wr): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| errors::internal(format!("creating the readiness pipe: {e}")))?;
        let wr_fd = wr.as_raw_fd();
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(spec.args(target))
            .arg("--ready-fd")
            .arg(wr_fd.to_string())
            .stdin(Stdio::null())
            // Its own process group: a Ctrl-C meant for the plugin must not
            // unmount volumes behind the supervisor's back.
            .process_group(0)
            .kill_on_drop(false);
        let last_cap = last_capability();
        // SAFETY: runs in the forked child before exec; fcntl, prctl and
        // capget/capset are async-signal-safe and nothing allocates. Only
        // this child inherits the write end, so EOF on the pipe means this
        // child exited.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(wr_fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                restrict_capabilities(last_cap);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| errors::internal(format!("starting {} mount: {e}", self.exe.display())))?;
        drop(wr);
        let Some(pid) = child.id().map(|id| Pid::from_raw(id as i32)) else {
            return Err(errors::internal("the mount process vanished at start"));
        };
        let line = read_ready(rd, READY_TIMEOUT).await;
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                let _ = detach(target);
                return Err(if e.kind() == io::ErrorKind::TimedOut {
                    Status::deadline_exceeded(format!(
                        "mount of {} on {} was not ready within {:?}; is the server reachable?",
                        spec.source,
                        target.display(),
                        READY_TIMEOUT
                    ))
                } else {
                    errors::internal(format!("reading the mount readiness pipe: {e}"))
                });
            }
        };
        let line = line.trim_end();
        if line != "OK" {
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            let how = match status {
                Ok(Ok(st)) => describe_exit(&st),
                _ => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    "killed".into()
                }
            };
            let _ = detach(target);
            let err = match line.strip_prefix("ERR ") {
                Some(reason) => errors::from_mount_child(reason),
                None => errors::internal(format!("mount process {how} before the mount was ready")),
            };
            warn!(target = %target.display(), source = %spec.source, code = ?err.code(), error = %err.message(), "mount failed");
            return Err(err);
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        info!(
            target = %target.display(), source = %spec.source, pid = pid.as_raw(),
            ready_ms = started.elapsed().as_millis() as u64, "mounted"
        );
        let (tx, rx) = watch::channel(None);
        let events = self.events.clone();
        let t = target.to_path_buf();
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(st) => describe_exit(&st),
                Err(e) => format!("could not be waited for: {e}"),
            };
            let _ = tx.send(Some(how.clone()));
            let _ = events.send(Event::Exited {
                target: t,
                generation,
                how,
            });
        });
        Ok(State::Running {
            pid,
            generation,
            started,
            exited: rx,
        })
    }

    /// SIGTERMs mount processes of ours left on `target` by an earlier plugin.
    async fn kill_orphans(&self, target: &Path) {
        for (pid, _) in mount_processes(&self.exe, target) {
            info!(target = %target.display(), pid = pid.as_raw(), "stopping an untracked mount process");
            stop_pid(pid, None).await;
        }
    }

    /// Stops the child serving `target` (SIGTERM: flush, unmount), detaches
    /// the mount if it is still there. Idempotent.
    pub async fn unpublish(&self, target: &Path) -> Result<(), Status> {
        let _guard = self.lock_target(target)?;
        let entry = self.entries.lock().remove(target);
        match entry {
            Some(Entry {
                state: State::Running { pid, exited, .. },
                ..
            }) => {
                info!(target = %target.display(), pid = pid.as_raw(), "stopping mount process");
                stop_pid(pid, Some(exited)).await;
            }
            Some(Entry {
                state: State::Dead { .. },
                ..
            }) => {}
            None => self.kill_orphans(target).await,
        }
        detach(target)
    }

    /// Stops every child (plugin shutdown), in parallel.
    pub async fn shutdown(&self) {
        let entries: Vec<(PathBuf, Entry)> = self.entries.lock().drain().collect();
        let stops = entries.into_iter().map(|(target, e)| async move {
            if let State::Running { pid, exited, .. } = e.state {
                info!(target = %target.display(), pid = pid.as_raw(), "stopping mount process");
                stop_pid(pid, Some(exited)).await;
            }
            // Also a dead child's mount, which would stay behind as ENOTCONN.
            let _ = detach(&target);
            // And the empty directory: Swarm re-sends NodePublish only when
            // dockerd restarts, so after a plugin restart it would bind the
            // bare directory into the next task, whose writes would land on
            // this node's disk. Missing, the bind fails and says so.
            // (remove_dir takes only an empty, unmounted directory.)
            let _ = std::fs::remove_dir(&target);
        });
        futures::future::join_all(stops).await;
    }

    /// Lets go of every child without stopping it, for a plugin that exits
    /// but leaves its volumes mounted (`CSI_NFS_FUSE_KEEP_MOUNTS`): they
    /// keep serving, and the next plugin adopts each on NodePublish or
    /// stops it on NodeUnpublish. A dead child's mount is detached now (it
    /// would only answer ENOTCONN). Returns how many were left running.
    pub fn release_all(&self) -> usize {
        let entries: Vec<(PathBuf, Entry)> = self.entries.lock().drain().collect();
        let mut kept = 0;
        for (target, e) in entries {
            match e.state {
                State::Running { pid, exited, .. } if exited.borrow().is_none() => {
                    info!(target = %target.display(), pid = pid.as_raw(), "leaving the mount process running");
                    kept += 1;
                }
                _ => {
                    let _ = detach(&target);
                }
            }
        }
        kept
    }

    /// Handles exits and restarts dead children, until the supervisor is dropped.
    async fn restart_loop(me: std::sync::Weak<Self>, mut rx: mpsc::UnboundedReceiver<Event>) {
        loop {
            let ev = tokio::time::timeout(POLL, rx.recv()).await;
            let Some(sup) = me.upgrade() else { return };
            match ev {
                Ok(Some(Event::Exited {
                    target,
                    generation,
                    how,
                })) => sup.on_exit(&target, generation, how),
                Ok(None) => return,
                Err(_) => {}
            }
            sup.restart_due().await;
        }
    }

    fn on_exit(&self, target: &Path, generation: u64, how: String) {
        let mut entries = self.entries.lock();
        let Some(e) = entries.get_mut(target) else {
            return; // unpublished: an expected exit
        };
        let State::Running {
            generation: g,
            started,
            ..
        } = &e.state
        else {
            return;
        };
        if *g != generation {
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            e.failures = 0;
        }
        let delay = restart_delay(e.failures);
        error!(
            target = %target.display(), volume_id = %e.spec.volume_id, exit = %how,
            restart_in_ms = delay.as_millis() as u64, "mount process died unexpectedly; restarting it"
        );
        e.failures += 1;
        e.state = State::Dead {
            reason: how,
            retry_at: Instant::now() + delay,
        };
    }

    async fn restart_due(&self) {
        let now = Instant::now();
        let due: Vec<(PathBuf, MountSpec, u32)> = self
            .entries
            .lock()
            .iter()
            .filter_map(|(t, e)| match &e.state {
                State::Dead { retry_at, .. } if *retry_at <= now => {
                    Some((t.clone(), e.spec.clone(), e.failures))
                }
                _ => None,
            })
            .collect();
        for (target, spec, failures) in due {
            // A publish or unpublish of this target is running: it decides.
            let Ok(_guard) = self.lock_target(&target) else {
                continue;
            };
            let still_dead = matches!(
                self.entries.lock().get(&target),
                Some(Entry { state: State::Dead { .. }, spec: s, .. }) if *s == spec
            );
            if !still_dead {
                continue;
            }
            // The dead mount stays until the server answers: while it is
            // there, every access fails with ENOTCONN, where a detached
            // target would be a bare directory that a new task binds and
            // writes to on this node's disk.
            if let Err(why) = server_answers(&spec).await {
                warn!(target = %target.display(), error = %why.message(), "server still unreachable; the dead mount stays until it answers");
                if let Some(e) = self.entries.lock().get_mut(&target) {
                    e.state = State::Dead {
                        reason: why.message().to_string(),
                        retry_at: Instant::now() + restart_delay(failures),
                    };
                    e.failures = failures + 1;
                }
                continue;
            }
            if let Err(e) = detach(&target) {
                warn!(target = %target.display(), error = %e.message(), "could not detach the dead mount");
            }
            // Removed after a failed attempt (below): made again to mount on.
            let _ = std::fs::create_dir(&target);
            match self.spawn_into(&target, spec, failures.max(1)).await {
                Ok(()) => info!(target = %target.display(), "mount process restarted"),
                Err(e) => {
                    warn!(target = %target.display(), code = ?e.code(), error = %e.message(), "restarting the mount process failed; will retry");
                    // The server answered the probe but the mount failed:
                    // no bare directory is left for a task to bind and
                    // write to on this node's disk (a missing one fails the
                    // bind loudly), as at plugin shutdown.
                    let _ = std::fs::remove_dir(&target);
                }
            }
        }
    }

    /// The reason the child of `target` last died, if it is down.
    pub fn down_reason(&self, target: &Path) -> Option<String> {
        match self.entries.lock().get(target).map(|e| &e.state) {
            Some(State::Dead { reason, .. }) => Some(reason.clone()),
            _ => None,
        }
    }
}

/// Whether `spec`'s server answers now (MOUNT of the export, FSINFO), with
/// the short deadlines of the controller's calls; if not, why, as the
/// gRPC status NodePublish gives (UNAVAILABLE for an unreachable server).
async fn server_answers(spec: &MountSpec) -> Result<(), Status> {
    use super::controller::{quick_config, root_cred};
    use crate::options::{MountOptions, NfsSource};
    let source = NfsSource::parse(&spec.source).map_err(|e| errors::invalid(e.to_string()))?;
    let opts = MountOptions::parse(&spec.options).map_err(|e| errors::invalid(e.to_string()))?;
    let mut cfg = quick_config(&opts);
    cfg.port = cfg.port.or(source.port);
    let cred = root_cred();
    let sess = crate::nfs::session::connect(&source.host, &source.path, &cfg, &cred)
        .await
        .map_err(|e| errors::from_connect(&e))?;
    let _ = tokio::time::timeout(Duration::from_secs(3), sess.unmount(&cred)).await;
    Ok(())
}

/// Reads the child's readiness line (or EOF) within `limit`.
async fn read_ready(rd: OwnedFd, limit: Duration) -> io::Result<String> {
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(rd)?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = rx.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.contains(&b'\n') || buf.len() > 64 << 10 {
                break;
            }
        }
        Ok::<_, io::Error>(())
    };
    match tokio::time::timeout(limit, read).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "readiness timeout")),
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// SIGTERM, wait up to STOP_TIMEOUT for the exit, then SIGKILL.
async fn stop_pid(pid: Pid, exited: Option<watch::Receiver<Option<String>>>) {
    // Never signal a pid that was already reaped (and might be reused).
    let already_gone = match &exited {
        Some(rx) => rx.borrow().is_some(),
        None => process_gone(pid),
    };
    if already_gone || pid.as_raw() <= 0 || kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let wait = async {
        match exited {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| s.is_some()).await;
            }
            None => {
                while !process_gone(pid) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    if tokio::time::timeout(STOP_TIMEOUT, wait).await.is_err() {
        warn!(
            pid = pid.as_raw(),
            "mount process did not exit after SIGTERM; killing it"
        );
        let _ = kill(pid, Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(restart_delay(0), Duration::from_millis(200));
        assert_eq!(restart_delay(1), Duration::from_millis(400));
        assert_eq!(restart_delay(30), MAX_RESTART_DELAY);
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(&ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
    }
}
