//! The filesystem core: NFSv3 semantics behind a FUSE-shaped API, with no
//! fuser types, so tests drive it in-process without mounting.

pub mod errno;
pub mod inode;
pub mod known_dirs;
pub mod pagecache;
pub mod readahead;
pub mod writeback;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use nfs3_types::nfs3::{
    Nfs3Option, createhow3, createverf3, devicedata3, mknoddata3, nfstime3, sattr3, set_atime,
    set_mtime, specdata3,
};
use parking_lot::Mutex;

pub use errno::FsError;
pub use inode::{AttrTimeouts, ROOT_INO};

use crate::nfs::client::sattr_mode;
use crate::nfs::{
    CookieVerf, CreatedOk, Fattr, FileHandle, FileType, NfsClient, NfsSession, NfsTime, Wcc,
};
use crate::options::{LookupCache, MountOptions};
use crate::rpc::{AuthSys, Credential};
use inode::{InodeTable, Observed};
use known_dirs::{DirChange, KnownDirs};
use pagecache::PageCache;
use readahead::ReadAhead;
use writeback::WriteBack;

const NAME_MAX: usize = 255;

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// Most items one readdir answer hands out: more than a kernel buffer (a
/// page) holds even of one-letter names.
const REPLY_ITEMS_MAX: usize = 256;

/// A fetched listing page: usable items, cookie verifier, eof, last cookie.
type DirPage = (Vec<DirItem>, CookieVerf, bool, Option<u64>);

/// Longest name FUSE passes in a directory listing (FUSE_NAME_MAX).
const FUSE_NAME_MAX: usize = 1024;

/// Whether a name a server listed can be handed to the kernel: FUSE fails
/// the whole READDIR reply (EIO) over one empty name, one with '/' in it,
/// or one longer than FUSE_NAME_MAX, and no local file can have a NUL in
/// its name, so such an entry is left out and the rest still lists.
fn listable_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= FUSE_NAME_MAX && !name.contains(&b'/') && !name.contains(&0)
}

/// Leaves out the entries [`listable_name`] refuses, saying so once a page.
fn listable<T>(ino: u64, entries: Vec<T>, name: impl Fn(&T) -> &[u8]) -> Vec<T> {
    let before = entries.len();
    let mut first_bad = None;
    let kept: Vec<T> = entries
        .into_iter()
        .filter(|e| {
            let ok = listable_name(name(e));
            if !ok && first_bad.is_none() {
                first_bad = Some(String::from_utf8_lossy(name(e)).into_owned());
            }
            ok
        })
        .collect();
    if let Some(first) = first_bad {
        tracing::warn!(
            dir = ino,
            skipped = before - kept.len(),
            first = %first,
            "server listed names no local file can have; left out"
        );
    }
    kept
}

/// Who is asking: FUSE's request header.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            pid: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FsConfig {
    pub timeouts: AttrTimeouts,
    pub lookupcache: LookupCache,
    pub read_only: bool,
    pub force_uid: Option<u32>,
    pub force_gid: Option<u32>,
    pub cto: bool,
    pub rdirplus: bool,
    pub dirty_limit: usize,
    pub cache_size: u64,
    pub machine_name: Arc<str>,
    /// How long a partial chunk may wait for more data before it is sent.
    pub gather_age: Duration,
}

impl FsConfig {
    pub fn from_options(o: &MountOptions) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        Self {
            timeouts: AttrTimeouts {
                regmin: o.acregmin,
                regmax: o.acregmax,
                dirmin: o.acdirmin,
                dirmax: o.acdirmax,
            },
            lookupcache: o.lookupcache,
            read_only: o.read_only,
            force_uid: o.uid,
            force_gid: o.gid,
            cto: o.cto,
            rdirplus: o.rdirplus,
            // Written data stays in memory until COMMITted; a writer that
            // hits the bound waits for the server's fsync. Half the cache
            // size keeps a 1 GiB dd streaming (a quarter stalled it on
            // COMMITs: 370-410 MiB/s against 620-665 here) with peak RSS
            // under writes about what a quarter cost while calls held a
            // second copy of their data (140 MiB at the default).
            dirty_limit: (o.cache_size / 2).clamp(8 << 20, 512 << 20) as usize,
            cache_size: o.cache_size,
            machine_name: host.into(),
            gather_age: writeback::GATHER_AGE,
        }
    }
}

/// A directory entry handed to the kernel.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ino: u64,
    pub generation: u64,
    pub attr: Fattr,
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The cached data is still valid: the kernel may keep its page cache.
    pub keep_cache: bool,
    /// Opened for reading only: its close has nothing to flush.
    pub read_only: bool,
}

/// An open file handle: which inode, whether it may write, and the last
/// failed write its closes and fsyncs have reported, and its writes (see
/// `WriteBack::take_error`). Two cursors, because a write's report can be
/// lost: FUSE splits a large write(2), and an error on a later piece
/// becomes a short count; the close must still report it, as the kernel's
/// does after a write already told of it.
#[derive(Debug, Clone, Copy)]
struct OpenFile {
    ino: u64,
    writable: bool,
    error_cursor: u64,
    write_cursor: u64,
}

fn writable_flags(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

#[derive(Debug, Clone, Copy)]
pub enum TimeSet {
    Now,
    At(SystemTime),
}

#[derive(Debug, Clone, Default)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    pub name: Bytes,
    pub kind: FileType,
    /// Offset (NFS cookie) to continue after this entry.
    pub offset: u64,
    /// Attributes and handle, for READDIRPLUS.
    pub entry: Option<Entry>,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// A cached name → inode result (or its absence), valid while the parent
/// directory's attributes are fresh and its mtime is the one recorded.
#[derive(Debug, Clone, Copy)]
struct Dentry {
    ino: Option<u64>,
    dir_mtime: crate::nfs::NfsTime,
    at: Instant,
}

/// Supplementary groups read from /proc for a pid: (when, uid, groups).
type CachedGroups = (Instant, u32, Vec<u32>);

struct DirStream {
    ino: u64,
    verf: CookieVerf,
    page: Vec<DirItem>,
    eof: bool,
}

pub struct NfsFs {
    nfs: NfsClient,
    session: NfsSession,
    cfg: FsConfig,
    inodes: Arc<InodeTable>,
    writeback: Arc<WriteBack>,
    files: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, DirStream>>,
    next_handle: AtomicU64,
    open_files: AtomicUsize,
    silly_counter: AtomicU64,
    groups: Mutex<lru::LruCache<u32, CachedGroups>>,
    /// Recently seen (parent, name) → inode, so unlink and rename can expire
    /// the attributes (nlink, ctime) of the object they changed.
    dentries: Mutex<lru::LruCache<(u64, Bytes), Dentry>>,
    /// Directories we made whose every entry we know (see [`KnownDirs`]).
    known_dirs: Mutex<KnownDirs>,
    /// PATHCONF's verdict: names compared byte for byte (see `KnownDirs`).
    exact_names: tokio::sync::OnceCell<bool>,
    pages: Arc<PageCache>,
    readahead: Mutex<HashMap<u64, ReadAhead>>,
    /// One root revalidation at a time.
    root_lock: tokio::sync::Mutex<()>,
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_MAX {
        return Err(FsError::NAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::INVAL);
    }
    Ok(())
}

/// The step an exclusive create's atime marker is cut to, so that a server
/// keeping times to `delta` (FSINFO time_delta) stores it exactly: at least a
/// microsecond, and a multiple of `delta`. `None` when the server keeps
/// times more coarsely than a millisecond: its marker would be shared by
/// too many creates to tell ours.
fn marker_step(delta: NfsTime) -> Option<u32> {
    match (delta.seconds, delta.nseconds) {
        (0, 0) => Some(1000),
        (0, g @ 1..=1_000_000) => Some(1000u32.div_ceil(g) * g),
        _ => None,
    }
}

/// The atime an exclusive create sets, to know its own file again.
fn exclusive_marker(now: SystemTime, step: u32) -> nfstime3 {
    let t = to_nfstime(now);
    nfstime3 {
        nseconds: t.nseconds / step * step,
        ..t
    }
}

fn to_nfstime(t: SystemTime) -> nfstime3 {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    nfstime3 {
        seconds: d.as_secs().min(u32::MAX as u64) as u32,
        nseconds: d.subsec_nanos(),
    }
}

/// Supplementary groups of `pid` from /proc, as the kernel client would send.
fn proc_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl NfsFs {
    pub fn new(session: NfsSession, cfg: FsConfig) -> Arc<Self> {
        let inodes = Arc::new(InodeTable::new(
            session.root.clone(),
            session.root_attr,
            cfg.timeouts,
        ));
        let pages = PageCache::new(session.rsize, cfg.cache_size);
        let (sink_inodes, sink_pages) = (inodes.clone(), pages.clone());
        let sink: writeback::WccSink = Arc::new(move |ino: u64, wcc: &Wcc, written| {
            Self::track_wcc(&sink_inodes, ino, wcc, written.is_some());
            // A read that raced this WRITE may have cached the bytes it
            // replaced, or the file's old last block, short of the new end.
            if let Some((from, to)) = written
                && let Some(cgen) = sink_inodes.with(ino, |i| i.cache_gen)
            {
                sink_pages.invalidate_range(cgen, from, to);
                if let Some(before) = wcc.before {
                    sink_pages.invalidate_end(cgen, before.size, from);
                }
            }
        });
        let writeback = WriteBack::new(
            session.nfs.clone(),
            session.wsize,
            cfg.dirty_limit,
            cfg.gather_age,
            sink,
        );
        Arc::new(Self {
            nfs: session.nfs.clone(),
            session,
            cfg,
            inodes,
            writeback,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            open_files: AtomicUsize::new(0),
            silly_counter: AtomicU64::new(0),
            groups: Mutex::new(lru::LruCache::new(NonZeroUsize::new(256).unwrap())),
            dentries: Mutex::new(lru::LruCache::new(NonZeroUsize::new(65536).unwrap())),
            known_dirs: Mutex::new(KnownDirs::new()),
            exact_names: tokio::sync::OnceCell::new(),
            pages,
            readahead: Mutex::new(HashMap::new()),
            root_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn session(&self) -> &NfsSession {
        &self.session
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Weak cache consistency: if the pre-operation attributes are the ones
    /// our cached data belongs to, the change was ours and the data stays
    /// valid under the new key; otherwise someone else changed the file.
    /// A reply to our own WRITE without pre-operation attributes (ganesha
    /// sends none) is taken as ours, as the kernel client takes it
    /// (`nfs_post_op_update_inode_force_wcc`): else every write would drop
    /// the whole file's cache.
    fn track_wcc(inodes: &InodeTable, ino: u64, wcc: &Wcc, own_write: bool) {
        inodes.with(ino, |i| {
            if let Some(after) = wcc.after {
                let before = wcc.before.or(if own_write { i.data_key } else { None });
                match (before, i.data_key) {
                    (Some(before), Some(key)) if before == key => {
                        i.data_key = Some(after.change_key())
                    }
                    (Some(_), Some(_)) | (None, _) => {
                        // Someone else changed the file: our blocks are suspect.
                        i.data_key = None;
                        i.cache_gen = inode::next_cache_gen();
                    }
                    (Some(_), None) => {}
                }
            }
        });
        if let Some(after) = wcc.after {
            inodes.update_attr(ino, &after, Observed::Changed);
        }
    }

    fn cred(&self, c: &Caller) -> Credential {
        let uid = self.cfg.force_uid.unwrap_or(c.uid);
        let gid = self.cfg.force_gid.unwrap_or(c.gid);
        let gids = if self.cfg.force_uid.is_some() || c.pid == 0 {
            Vec::new()
        } else {
            let mut cache = self.groups.lock();
            match cache.get(&c.pid) {
                Some((at, u, g)) if *u == c.uid && at.elapsed() < Duration::from_secs(2) => {
                    g.clone()
                }
                _ => {
                    let g = proc_groups(c.pid);
                    cache.put(c.pid, (Instant::now(), c.uid, g.clone()));
                    g
                }
            }
        };
        Credential::Sys(AuthSys::new(uid, gid, gids, self.cfg.machine_name.clone()))
    }

    fn fh(&self, ino: u64) -> Result<FileHandle, FsError> {
        self.inodes.fh(ino).ok_or(FsError::STALE)
    }

    fn writable(&self) -> Result<(), FsError> {
        if self.cfg.read_only {
            Err(FsError::ROFS)
        } else {
            Ok(())
        }
    }

    fn entry_ttl(&self) -> Duration {
        match self.cfg.lookupcache {
            LookupCache::None => Duration::ZERO,
            _ => self.cfg.timeouts.dirmin,
        }
    }

    /// How long the kernel may cache a negative lookup.
    pub fn negative_ttl(&self) -> Duration {
        match self.cfg.lookupcache {
            // Kept short: the kernel client revalidates negative dentries on
            // open/create, which FUSE cannot ask us to do.
            LookupCache::All => self.cfg.timeouts.dirmin.min(Duration::from_secs(1)),
            _ => Duration::ZERO,
        }
    }

    fn entry_for(&self, fh: &FileHandle, attr: &Fattr, lookups: u64, seen: Observed) -> Entry {
        // Data we have accepted but not yet sent is newer than the server's
        // view: never report a size that would make the kernel drop it
        // (a READDIRPLUS racing a write would otherwise shrink the file).
        let (ino, generation) = self.inodes.remember(fh, attr, lookups, seen);
        // The table holds the newest attributes we know (by ctime); a reply
        // produced before our writes reached the server must not win.
        let attr = &self.current_attr(ino, *attr);
        let attr_ttl = self
            .inodes
            .get(ino)
            .map(|i| i.expires.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        Entry {
            ino,
            generation,
            attr: *attr,
            entry_ttl: self.entry_ttl(),
            attr_ttl,
        }
    }

    /// The entry for `name` in `parent` after LOOKUP, CREATE, MKDIR, LINK…:
    /// fetches the attributes if the reply came without them, counts
    /// `lookups` kernel lookups (one for a reply the kernel gets now) and
    /// remembers the name.
    #[allow(clippy::too_many_arguments)]
    async fn named_entry(
        &self,
        cred: &Credential,
        parent: u64,
        name: &[u8],
        fh: &FileHandle,
        attr: Option<Fattr>,
        seen: Observed,
        lookups: u64,
    ) -> Result<Entry, FsError> {
        let (attr, seen) = match attr {
            Some(a) => (a, seen),
            None => {
                let t = self.inodes.stamp();
                (self.nfs.getattr(cred, fh).await?.attr, Observed::Since(t))
            }
        };
        let e = self.entry_for(fh, &attr, lookups, seen);
        self.note_dentry(parent, name, e.ino);
        Ok(e)
    }

    /// The attributes to hand the kernel for `ino`: the newest known, with
    /// the size never below data written locally but not yet sent.
    fn current_attr(&self, ino: u64, fallback: Fattr) -> Fattr {
        let mut attr = self.inodes.get(ino).map_or(fallback, |i| i.attr);
        if let Some(end) = self.writeback.local_end(ino) {
            attr.size = attr.size.max(end);
        }
        attr
    }

    fn note_dentry(&self, parent: u64, name: &[u8], ino: u64) {
        self.remember_name(parent, name, Some(ino));
    }

    fn remember_name(&self, parent: u64, name: &[u8], ino: Option<u64>) {
        let Some(dir) = self.inodes.get(parent) else {
            return;
        };
        self.dentries.lock().put(
            (parent, Bytes::copy_from_slice(name)),
            Dentry {
                ino,
                dir_mtime: dir.attr.mtime,
                at: Instant::now(),
            },
        );
    }

    /// The lookup cache: a hit needs the parent's attributes to be fresh and
    /// its mtime unchanged since the name was seen (lookupcache=all|positive).
    fn cached_lookup(&self, parent: u64, name: &[u8]) -> Option<Result<Entry, FsError>> {
        if self.cfg.lookupcache == LookupCache::None {
            return None;
        }
        let dir = self.inodes.get(parent)?;
        if Instant::now() >= dir.expires {
            return None;
        }
        if self.cfg.lookupcache == LookupCache::All
            && self.known_dirs.lock().absent(
                parent,
                dir.attr.change_key(),
                name,
                self.negative_ttl(),
            )
        {
            return Some(Err(FsError::NOENT));
        }
        let d = *self
            .dentries
            .lock()
            .get(&(parent, Bytes::copy_from_slice(name)))?;
        if d.dir_mtime != dir.attr.mtime {
            return None;
        }
        match d.ino {
            // Absence is trusted only briefly: another client's create does
            // not change anything we can see until the directory's
            // attributes are fetched again.
            None if self.cfg.lookupcache == LookupCache::All
                && d.at.elapsed() < self.negative_ttl() =>
            {
                Some(Err(FsError::NOENT))
            }
            None => None,
            Some(ino) => {
                let now = Instant::now();
                let e = self.inodes.with(ino, |i| {
                    (now < i.expires).then(|| {
                        i.nlookup += 1;
                        Entry {
                            ino,
                            generation: i.generation,
                            attr: i.attr,
                            entry_ttl: Duration::ZERO,
                            attr_ttl: i.expires - now,
                        }
                    })
                })??;
                Some(Ok(Entry {
                    entry_ttl: self.entry_ttl(),
                    ..e
                }))
            }
        }
    }

    /// The object `name` named changed (nlink, ctime): expire its attributes.
    /// Returns the inode the name last led to, if we had seen it.
    fn expire_dentry(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let key = (parent, Bytes::copy_from_slice(name));
        let Some(Dentry { ino: Some(ino), .. }) = self.dentries.lock().pop(&key) else {
            return None;
        };
        self.inodes.invalidate_attr(ino);
        Some(ino)
    }

    /// Whether the server compares names byte for byte (PATHCONF: not case
    /// insensitive, no truncation), so the names we made are exactly those
    /// a LOOKUP would find. Asked once; a failed PATHCONF is asked again.
    async fn names_compare_exactly(&self, c: &Caller) -> bool {
        let asked = self
            .exact_names
            .get_or_try_init(|| async {
                let p = self
                    .nfs
                    .pathconf(&self.cred(c), &self.fh(ROOT_INO)?)
                    .await?;
                Ok::<_, FsError>(p.no_trunc && p.case_preserving && !p.case_insensitive)
            })
            .await;
        asked.is_ok_and(|exact| *exact)
    }

    /// A change that failed (EEXIST: someone else made the name; a timeout:
    /// it may have happened) leaves us unsure what the directories hold.
    fn unsure_of(&self, dirs: &[u64]) {
        let mut known = self.known_dirs.lock();
        for d in dirs {
            known.forget(*d);
        }
    }

    /// Records our own change to a directory's entries, reported with `wcc`.
    fn update_dir(&self, dir_ino: u64, wcc: &Wcc, changes: &[DirChange]) {
        self.known_dirs
            .lock()
            .changed(dir_ino, wcc, changes, self.negative_ttl());
        match wcc.after {
            Some(a) => self.inodes.update_attr(dir_ino, &a, Observed::Changed),
            None => self.inodes.invalidate_attr(dir_ino),
        }
    }

    async fn lookup_once(&self, c: &Caller, parent: u64, name: &[u8]) -> Result<Entry, FsError> {
        check_name(name)?;
        if let Some(hit) = self.cached_lookup(parent, name) {
            return hit;
        }
        let dir = self.fh(parent)?;
        let cred = self.cred(c);
        let sent = Observed::Since(self.inodes.stamp());
        let ok = match self.nfs.lookup(&cred, &dir, name).await {
            Ok(ok) => ok,
            Err(crate::nfs::Failure::Nfs {
                status: nfs3_types::nfs3::nfsstat3::NFS3ERR_NOENT,
                detail,
            }) => {
                if let Some(d) = detail.attr {
                    self.inodes.update_attr(parent, &d, sent);
                }
                self.remember_name(parent, name, None);
                return Err(FsError::NOENT);
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(d) = ok.dir_attr {
            self.inodes.update_attr(parent, &d, sent);
        }
        self.named_entry(&cred, parent, name, &ok.fh, ok.attr, sent, 1)
            .await
    }

    // Public operations. Each retries once after revalidating the export root
    // when the root's handle went stale (the export was re-created on the
    // server), so the mount never needs remounting to see the new tree.

    pub async fn lookup(&self, c: &Caller, parent: u64, name: &[u8]) -> Result<Entry, FsError> {
        self.root_retry(parent, || self.lookup_once(c, parent, name))
            .await
    }

    pub async fn getattr(&self, c: &Caller, ino: u64) -> Result<(Fattr, Duration), FsError> {
        self.root_retry(ino, || self.getattr_once(c, ino)).await
    }

    pub async fn setattr(
        &self,
        c: &Caller,
        ino: u64,
        set: SetAttrs,
    ) -> Result<(Fattr, Duration), FsError> {
        self.root_retry(ino, || self.setattr_once(c, ino, set.clone()))
            .await
    }

    pub async fn mknod(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Entry, FsError> {
        self.root_retry(parent, || self.mknod_once(c, parent, name, mode, rdev))
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))
    }

    pub async fn mkdir(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<Entry, FsError> {
        self.root_retry(parent, || self.mkdir_once(c, parent, name, mode))
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))
    }

    pub async fn symlink(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<Entry, FsError> {
        self.root_retry(parent, || self.symlink_once(c, parent, name, target))
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))
    }

    pub async fn unlink(&self, c: &Caller, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.root_retry(parent, || self.unlink_once(c, parent, name))
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))
    }

    pub async fn rmdir(&self, c: &Caller, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.root_retry(parent, || self.rmdir_once(c, parent, name))
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))
    }

    pub async fn create(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, Opened), FsError> {
        self.root_retry(parent, || self.create_once(c, parent, name, mode, flags))
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))
    }

    pub async fn readdir(
        &self,
        c: &Caller,
        handle: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Vec<DirItem>, FsError> {
        let ino = self
            .dirs
            .lock()
            .get(&handle)
            .map(|d| d.ino)
            .ok_or(FsError::BADF)?;
        self.root_retry(ino, || self.readdir_once(c, handle, offset, plus))
            .await
    }

    pub async fn statfs(&self, c: &Caller) -> Result<StatFs, FsError> {
        self.root_retry(ROOT_INO, || self.statfs_once(c)).await
    }

    pub async fn access(&self, c: &Caller, ino: u64, mask: i32) -> Result<(), FsError> {
        self.root_retry(ino, || self.access_once(c, ino, mask))
            .await
    }

    async fn root_retry<T, Fut>(&self, ino: u64, mut op: impl FnMut() -> Fut) -> Result<T, FsError>
    where
        Fut: std::future::Future<Output = Result<T, FsError>>,
    {
        let r = op().await;
        if ino != ROOT_INO {
            return r;
        }
        // A server may keep answering for a deleted export directory (it
        // still holds it open) instead of saying ESTALE; a directory with no
        // links left is just as dead.
        let unlinked = self.inodes.get(ROOT_INO).is_some_and(|i| i.attr.nlink == 0);
        if (r.as_ref().err() == Some(&FsError::STALE) || unlinked) && self.revalidate_root().await {
            return op().await;
        }
        r
    }

    /// Asks mountd for the export's handle again. Returns true if the root
    /// changed (and was replaced), so the failed operation is worth retrying.
    pub async fn revalidate_root(&self) -> bool {
        let cred = self.cred(&Caller::root());
        let _serial = self.root_lock.lock().await;
        let Some(old) = self.inodes.fh(ROOT_INO) else {
            return false;
        };
        match self.session.remount(&cred).await {
            Ok((fh, attr)) if fh != old => {
                tracing::warn!(export = %self.session.export, "export root handle went stale; using the new one");
                self.inodes.replace_root(&fh, &attr);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(export = %self.session.export, error = %e, "revalidating the export root failed");
                false
            }
        }
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    /// Returns attributes and how long the kernel may cache them.
    async fn getattr_once(&self, c: &Caller, ino: u64) -> Result<(Fattr, Duration), FsError> {
        if self.writeback.is_dirty(ino) {
            // Size and mtime must include what we have written.
            self.writeback.drain(ino).await?;
        }
        let inode = self.inodes.get(ino).ok_or(FsError::STALE)?;
        let now = Instant::now();
        if now < inode.expires {
            return Ok((inode.attr, inode.expires - now));
        }
        self.refresh_attr(c, ino, &inode.fh).await
    }

    async fn refresh_attr(
        &self,
        c: &Caller,
        ino: u64,
        fh: &FileHandle,
    ) -> Result<(Fattr, Duration), FsError> {
        let sent = Observed::Since(self.inodes.stamp());
        let fetched = self.nfs.getattr(&self.cred(c), fh).await?.attr;
        self.inodes.update_attr(ino, &fetched, sent);
        // Refused if a change of ours completed while the GETATTR was out:
        // the table then holds the newer attributes.
        Ok(self
            .inodes
            .get(ino)
            .map(|i| (i.attr, i.expires.saturating_duration_since(Instant::now())))
            .unwrap_or((fetched, Duration::ZERO)))
    }

    async fn setattr_once(
        &self,
        c: &Caller,
        ino: u64,
        set: SetAttrs,
    ) -> Result<(Fattr, Duration), FsError> {
        self.writable()?;
        let fh = self.fh(ino)?;
        // A WRITE the server applies after the SETATTR would move mtime past
        // a time just set (tar's restored mtimes) or regrow a truncated file.
        if self.writeback.has_pending(ino) {
            self.writeback.settle(ino, set.size.is_some()).await?;
        }
        if let Some(size) = set.size {
            self.writeback.truncate(ino, size);
        }
        let time = |t: Option<TimeSet>| match t {
            None => (false, None),
            Some(TimeSet::Now) => (true, None),
            Some(TimeSet::At(t)) => (true, Some(to_nfstime(t))),
        };
        let (aset, at) = time(set.atime);
        let (mset, mt) = time(set.mtime);
        let attrs = sattr3 {
            mode: set
                .mode
                .map_or(Nfs3Option::None, |m| Nfs3Option::Some(m & 0o7777)),
            uid: set.uid.map_or(Nfs3Option::None, Nfs3Option::Some),
            gid: set.gid.map_or(Nfs3Option::None, Nfs3Option::Some),
            size: set.size.map_or(Nfs3Option::None, Nfs3Option::Some),
            atime: match (aset, at) {
                (false, _) => set_atime::DONT_CHANGE,
                (true, None) => set_atime::SET_TO_SERVER_TIME,
                (true, Some(t)) => set_atime::SET_TO_CLIENT_TIME(t),
            },
            mtime: match (mset, mt) {
                (false, _) => set_mtime::DONT_CHANGE,
                (true, None) => set_mtime::SET_TO_SERVER_TIME,
                (true, Some(t)) => set_mtime::SET_TO_CLIENT_TIME(t),
            },
        };
        let cred = self.cred(c);
        let ok = self.nfs.setattr(&cred, &fh, attrs, None).await?;
        if set.size.is_some() {
            // Our truncate changes the data; cached blocks past it are wrong.
            self.inodes.invalidate_data(ino);
        }
        match ok.wcc.after {
            Some(a) => {
                self.inodes.update_attr(ino, &a, Observed::Changed);
                let ttl = self
                    .inodes
                    .get(ino)
                    .map(|i| i.expires.saturating_duration_since(Instant::now()))
                    .unwrap_or_default();
                Ok((a, ttl))
            }
            None => self.refresh_attr(c, ino, &fh).await,
        }
    }

    pub async fn readlink(&self, c: &Caller, ino: u64) -> Result<Bytes, FsError> {
        let fh = self.fh(ino)?;
        Ok(self.nfs.readlink(&self.cred(c), &fh).await?.target)
    }

    async fn created(
        &self,
        c: &Caller,
        parent: u64,
        dir: &FileHandle,
        name: &[u8],
        ok: CreatedOk,
    ) -> Result<Entry, FsError> {
        self.update_dir(parent, &ok.dir_wcc, &[DirChange::Added(name)]);
        let cred = self.cred(c);
        let fh = match ok.fh {
            Some(fh) => fh,
            None => self.nfs.lookup(&cred, dir, name).await?.fh,
        };
        self.named_entry(&cred, parent, name, &fh, ok.attr, Observed::Changed, 1)
            .await
    }

    async fn mknod_once(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Entry, FsError> {
        self.writable()?;
        check_name(name)?;
        let dir = self.fh(parent)?;
        let attrs = sattr_mode(mode & 0o7777);
        let dev = || devicedata3 {
            dev_attributes: attrs.clone(),
            spec: specdata3 {
                specdata1: nix::sys::stat::major(rdev as u64) as u32,
                specdata2: nix::sys::stat::minor(rdev as u64) as u32,
            },
        };
        let cred = self.cred(c);
        let ok = match mode & libc::S_IFMT {
            // mknod(2) fails on an existing name, as O_EXCL does.
            libc::S_IFREG | 0 => return self.create_exclusive(c, parent, &dir, name, mode).await,
            libc::S_IFIFO => {
                self.nfs
                    .mknod(&cred, &dir, name, mknoddata3::NF3FIFO(attrs.clone()))
                    .await?
            }
            libc::S_IFSOCK => {
                self.nfs
                    .mknod(&cred, &dir, name, mknoddata3::NF3SOCK(attrs.clone()))
                    .await?
            }
            libc::S_IFCHR => {
                self.nfs
                    .mknod(&cred, &dir, name, mknoddata3::NF3CHR(dev()))
                    .await?
            }
            libc::S_IFBLK => {
                self.nfs
                    .mknod(&cred, &dir, name, mknoddata3::NF3BLK(dev()))
                    .await?
            }
            _ => return Err(FsError::INVAL),
        };
        self.created(c, parent, &dir, name, ok).await
    }

    async fn mkdir_once(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<Entry, FsError> {
        self.writable()?;
        check_name(name)?;
        let dir = self.fh(parent)?;
        let ok = self
            .nfs
            .mkdir(&self.cred(c), &dir, name, sattr_mode(mode & 0o7777))
            .await?;
        // Only the MKDIR reply's own attributes prove the directory empty.
        let made = ok.attr.map(|a| a.change_key());
        let entry = self.created(c, parent, &dir, name, ok).await?;
        if let Some(key) = made
            && self.names_compare_exactly(c).await
        {
            self.known_dirs.lock().made_empty(entry.ino, key);
        }
        Ok(entry)
    }

    async fn symlink_once(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<Entry, FsError> {
        self.writable()?;
        check_name(name)?;
        let dir = self.fh(parent)?;
        let ok = self
            .nfs
            .symlink(&self.cred(c), &dir, name, target, sattr3::default())
            .await?;
        self.created(c, parent, &dir, name, ok).await
    }

    pub async fn link(
        &self,
        c: &Caller,
        ino: u64,
        newparent: u64,
        newname: &[u8],
    ) -> Result<Entry, FsError> {
        self.writable()?;
        check_name(newname)?;
        let fh = self.fh(ino)?;
        let dir = self.fh(newparent)?;
        let cred = self.cred(c);
        let ok = self
            .nfs
            .link(&cred, &fh, &dir, newname)
            .await
            .inspect_err(|_| self.unsure_of(&[newparent]))?;
        self.update_dir(newparent, &ok.dir_wcc, &[DirChange::Added(newname)]);
        self.named_entry(
            &cred,
            newparent,
            newname,
            &fh,
            ok.attr,
            Observed::Changed,
            1,
        )
        .await
    }

    /// If `name` in `dir` is a file we hold open, renames it to a hidden
    /// `.nfs` name (as the kernel client's silly-rename does) so it stays
    /// readable until the last close. Returns true if it did.
    async fn silly_rename(
        &self,
        c: &Caller,
        parent: u64,
        dir: &FileHandle,
        name: &[u8],
    ) -> Result<bool, FsError> {
        if self.open_files.load(Ordering::Relaxed) == 0 {
            return Ok(false);
        }
        let cred = self.cred(c);
        let Ok(found) = self.nfs.lookup(&cred, dir, name).await else {
            return Ok(false);
        };
        let Some(attr) = found.attr else {
            return Ok(false);
        };
        let ino = self.inodes.ino_of(attr.fileid);
        let open = self
            .inodes
            .get(ino)
            .is_some_and(|i| i.open_count > 0 && i.fh == found.fh);
        // Another link keeps the file (and the open descriptor's handle)
        // alive: removing this name is enough, as the kernel client, which
        // silly-renames only a name whose own dentry is in use, would do.
        // Renaming every link would leave all but the last `.nfs` name behind.
        if !open || attr.ftype == FileType::Directory || attr.nlink > 1 {
            return Ok(false);
        }
        let n = self.silly_counter.fetch_add(1, Ordering::Relaxed);
        let silly = Bytes::from(format!(".nfs{:016x}{:08x}", attr.fileid, n));
        let ok = self
            .nfs
            .rename(&cred, dir, name, dir, &silly)
            .await
            .inspect_err(|_| self.unsure_of(&[parent]))?;
        self.update_dir(
            parent,
            &ok.to_wcc,
            &[DirChange::Removed(name), DirChange::Added(&silly)],
        );
        self.inodes
            .with(ino, |i| i.silly = Some((parent, silly, cred.clone())));
        self.expire_dentry(parent, name);
        self.inodes.invalidate_attr(ino);
        Ok(true)
    }

    async fn unlink_once(&self, c: &Caller, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.writable()?;
        check_name(name)?;
        let dir = self.fh(parent)?;
        if self.silly_rename(c, parent, &dir, name).await? {
            return Ok(());
        }
        let ok = self.nfs.remove(&self.cred(c), &dir, name).await?;
        self.update_dir(parent, &ok.dir_wcc, &[DirChange::Removed(name)]);
        self.expire_dentry(parent, name);
        Ok(())
    }

    async fn rmdir_once(&self, c: &Caller, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.writable()?;
        check_name(name)?;
        let dir = self.fh(parent)?;
        let ok = self.nfs.rmdir(&self.cred(c), &dir, name).await?;
        self.update_dir(parent, &ok.dir_wcc, &[DirChange::Removed(name)]);
        // Its inode number may soon name another directory.
        if let Some(gone) = self.expire_dentry(parent, name) {
            self.known_dirs.lock().forget(gone);
        }
        Ok(())
    }

    /// RENAME. NFSv3 has no atomic no-replace or exchange, so those flags are
    /// refused with EINVAL rather than emulated with a race.
    pub async fn rename(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<(), FsError> {
        self.writable()?;
        if flags != 0 {
            return Err(FsError::INVAL);
        }
        check_name(name)?;
        check_name(newname)?;
        let from = self.fh(parent)?;
        let to = self.fh(newparent)?;
        // An open file about to be replaced keeps its data, as on a local fs.
        self.silly_rename(c, newparent, &to, newname).await?;
        let ok = self
            .nfs
            .rename(&self.cred(c), &from, name, &to, newname)
            .await
            .inspect_err(|_| self.unsure_of(&[parent, newparent]))?;
        if parent == newparent {
            // One change, reported twice: apply it once.
            self.update_dir(
                parent,
                &ok.to_wcc,
                &[DirChange::Removed(name), DirChange::Added(newname)],
            );
        } else {
            self.update_dir(parent, &ok.from_wcc, &[DirChange::Removed(name)]);
            self.update_dir(newparent, &ok.to_wcc, &[DirChange::Added(newname)]);
        }
        self.expire_dentry(parent, name);
        self.expire_dentry(newparent, newname);
        Ok(())
    }

    fn register_open(&self, ino: u64, writable: bool) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let fh = self.inodes.with(ino, |i| {
            i.open_count += 1;
            i.fh.clone()
        });
        self.open_files.fetch_add(1, Ordering::Relaxed);
        let error_cursor = fh.map_or(0, |fh| self.writeback.error_cursor(ino, &fh));
        self.files.lock().insert(
            handle,
            OpenFile {
                ino,
                writable,
                error_cursor,
                write_cursor: error_cursor,
            },
        );
        handle
    }

    /// A failed write `handle` has yet to report, as the kernel reports one
    /// to every descriptor open when it failed: to its next write (`by_write`)
    /// and, separately, to its next close or fsync. Callers decide who is
    /// told: a read-only descriptor's close is not.
    fn unreported_error(&self, ino: u64, handle: u64, by_write: bool) -> Result<(), FsError> {
        let mut files = self.files.lock();
        let cursor = files.get_mut(&handle).map(|f| {
            if by_write {
                &mut f.write_cursor
            } else {
                &mut f.error_cursor
            }
        });
        self.writeback
            .take_error(ino, cursor, !by_write)
            .map_or(Ok(()), Err)
    }

    /// Whether `handle` may have written: a read-only descriptor's close
    /// must neither wait for another descriptor's data nor take the write
    /// error that descriptor's close is owed (the kernel client's
    /// nfs_file_flush only flushes FMODE_WRITE files, too).
    fn may_have_written(&self, handle: u64) -> bool {
        self.files.lock().get(&handle).is_none_or(|f| f.writable)
    }

    /// Close-to-open: every open revalidates attributes with the server.
    pub async fn open(&self, c: &Caller, ino: u64, flags: i32) -> Result<Opened, FsError> {
        let writable = writable_flags(flags);
        if writable {
            self.writable()?;
        }
        let inode = self.inodes.get(ino).ok_or(FsError::STALE)?;
        let attr = if self.cfg.cto || Instant::now() >= inode.expires {
            self.refresh_attr(c, ino, &inode.fh).await?.0
        } else {
            inode.attr
        };
        let key = attr.change_key();
        let keep_cache = self
            .inodes
            .with(ino, |i| {
                let keep = i.data_key == Some(key);
                if !keep {
                    i.cache_gen = inode::next_cache_gen();
                }
                i.data_key = Some(key);
                keep
            })
            .unwrap_or(false);
        Ok(Opened {
            fh: self.register_open(ino, writable),
            keep_cache,
            read_only: !writable,
        })
    }

    async fn create_once(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, Opened), FsError> {
        self.writable()?;
        check_name(name)?;
        let dir = self.fh(parent)?;
        let cred = self.cred(c);
        let entry = if flags & libc::O_EXCL != 0 {
            self.create_exclusive(c, parent, &dir, name, mode).await?
        } else {
            let ok = self
                .nfs
                .create(
                    &cred,
                    &dir,
                    name,
                    createhow3::UNCHECKED(sattr_mode(mode & 0o7777)),
                )
                .await?;
            self.created(c, parent, &dir, name, ok).await?
        };
        self.inodes
            .with(entry.ino, |i| i.data_key = Some(entry.attr.change_key()));
        let writable = writable_flags(flags);
        let handle = self.register_open(entry.ino, writable);
        Ok((
            entry,
            Opened {
                fh: handle,
                keep_cache: false,
                read_only: !writable,
            },
        ))
    }

    /// O_EXCL. The kernel client sends an EXCLUSIVE CREATE and then a
    /// SETATTR for the mode and the times the verifier took (RFC 1813
    /// §3.3.8); one GUARDED CREATE carrying the mode saves that round trip on
    /// every file tar or mkstemp makes. EXCLUSIVE exists so that a CREATE
    /// resent after a lost reply finds its own file instead of EEXIST.
    /// GUARDED keeps that promise with a marker: the CREATE sets atime to
    /// this client's clock (to the microsecond, or the server's time_delta),
    /// and when the call may have gone out twice, an EEXIST whose file has
    /// exactly that atime is the file our first copy made. A server that
    /// keeps times more coarsely than a millisecond gets EXCLUSIVE.
    async fn create_exclusive(
        &self,
        c: &Caller,
        parent: u64,
        dir: &FileHandle,
        name: &[u8],
        mode: u32,
    ) -> Result<Entry, FsError> {
        let cred = self.cred(c);
        let Some(step) = marker_step(self.session.fsinfo.time_delta) else {
            let verf = createverf3(rand::random());
            let ok = self
                .nfs
                .create(&cred, dir, name, createhow3::EXCLUSIVE(verf))
                .await?;
            let entry = self.created(c, parent, dir, name, ok).await?;
            // The verifier sits in atime and mtime until they are set.
            let set = SetAttrs {
                mode: Some(mode),
                atime: Some(TimeSet::Now),
                mtime: Some(TimeSet::Now),
                ..Default::default()
            };
            let (attr, _) = self.setattr(c, entry.ino, set).await?;
            return Ok(Entry { attr, ..entry });
        };
        let marker = exclusive_marker(SystemTime::now(), step);
        let attrs = sattr3 {
            atime: set_atime::SET_TO_CLIENT_TIME(marker),
            ..sattr_mode(mode & 0o7777)
        };
        let resends = || {
            let s = self.nfs.rpc().stats();
            (s.connects, s.retransmits)
        };
        let before = resends();
        let taken = match self
            .nfs
            .create(&cred, dir, name, createhow3::GUARDED(attrs))
            .await
        {
            Ok(ok) => return self.created(c, parent, dir, name, ok).await,
            Err(e) if e.status() == Some(nfs3_types::nfs3::nfsstat3::NFS3ERR_EXIST) => {
                FsError::from(e)
            }
            Err(e) => return Err(e.into()),
        };
        // Only a call that was written again (a reconnect or a retransmit
        // anywhere on the mount, counted conservatively) can have made the
        // file itself; otherwise a racing creator in the same microsecond
        // could pass for us and both would hold the "exclusive" file.
        if resends() == before {
            return Err(taken);
        }
        let sent = Observed::Since(self.inodes.stamp());
        let Ok(found) = self.nfs.lookup(&cred, dir, name).await else {
            return Err(taken);
        };
        if let Some(d) = found.dir_attr {
            self.inodes.update_attr(parent, &d, sent);
        }
        let ours = found.attr.as_ref().is_some_and(|a| {
            a.ftype == FileType::Regular
                && a.atime.seconds == marker.seconds
                && a.atime.nseconds == marker.nseconds
        });
        if !ours {
            return Err(taken);
        }
        tracing::info!(name = %String::from_utf8_lossy(name), "a resent exclusive CREATE found the file its first copy made");
        // No wcc for our own change: what the directory holds is known again
        // only after the next listing.
        self.unsure_of(&[parent]);
        self.named_entry(&cred, parent, name, &found.fh, found.attr, sent, 1)
            .await
    }

    /// READ. Sequential readers go through the page cache with readahead;
    /// random reads go straight to the server, split into rsize calls.
    pub async fn read(
        &self,
        c: &Caller,
        ino: u64,
        handle: u64,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FsError> {
        if self.writeback.is_dirty(ino) {
            self.writeback.drain(ino).await?;
        }
        let inode = self.inodes.get(ino).ok_or(FsError::STALE)?;
        let cred = self.cred(c);
        if size == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(size as u64);
        let window = self
            .readahead
            .lock()
            .entry(handle)
            .or_insert_with(|| ReadAhead::new(readahead::MAX_WINDOW.min(self.cfg.cache_size / 4)))
            .observe(offset, size as u64);
        let bs = self.pages.block_size();
        let (first, last) = (offset / bs, (end - 1) / bs);
        let cgen = inode.cache_gen;
        let cached = (first..=last).all(|i| self.pages.contains((cgen, i)));
        if window == 0 && !cached {
            return self.read_direct(&cred, ino, &inode.fh, offset, size).await;
        }
        let blocks = try_join_all((first..=last).map(|i| {
            let fetch = self.fetch_block(&cred, ino, &inode.fh, i);
            self.pages.get_or_fetch((cgen, i), fetch)
        }))
        .await?;
        // Readahead: keep the next blocks coming, within the known file size.
        if window > 0 {
            let size_hint = self.inodes.get(ino).map_or(0, |i| i.attr.size);
            let ra_end = end.saturating_add(window).min(size_hint);
            if ra_end > (last + 1) * bs {
                for i in last + 1..=(ra_end - 1) / bs {
                    let fetch = self.fetch_block(&cred, ino, &inode.fh, i);
                    self.pages.prefetch((cgen, i), fetch);
                }
            }
        }
        if blocks.len() == 1 && offset.is_multiple_of(bs) && blocks[0].len() as u64 <= size as u64 {
            return Ok(blocks.into_iter().next().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(size as usize);
        for (k, b) in blocks.iter().enumerate() {
            let start = (first + k as u64) * bs;
            let from = offset.saturating_sub(start) as usize;
            let to = ((end - start) as usize).min(b.len());
            if from < to {
                out.extend_from_slice(&b[from..to]);
            }
            if (b.len() as u64) < bs {
                break; // end of file
            }
        }
        Ok(out.freeze())
    }

    fn fetch_block(
        &self,
        cred: &Credential,
        ino: u64,
        fh: &FileHandle,
        idx: u64,
    ) -> impl std::future::Future<Output = Result<Bytes, FsError>> + Send + 'static {
        let (nfs, cred, fh, inodes) = (
            self.nfs.clone(),
            cred.clone(),
            fh.clone(),
            self.inodes.clone(),
        );
        let bs = self.pages.block_size();
        async move {
            let sent = Observed::Since(inodes.stamp());
            let r = nfs.read(&cred, &fh, idx * bs, bs as u32).await?;
            if let Some(a) = r.attr {
                inodes.update_attr(ino, &a, sent);
            }
            Ok(r.data)
        }
    }

    /// READ for a descriptor opened O_DIRECT: from the server, never from
    /// the page cache and with no readahead, as the kernel client does, so
    /// the reader sees another client's write at once (what O_DIRECT users
    /// on NFS, databases above all, rely on).
    pub async fn read_uncached(
        &self,
        c: &Caller,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FsError> {
        if self.writeback.is_dirty(ino) {
            self.writeback.drain(ino).await?;
        }
        let inode = self.inodes.get(ino).ok_or(FsError::STALE)?;
        if size == 0 {
            return Ok(Bytes::new());
        }
        self.read_direct(&self.cred(c), ino, &inode.fh, offset, size)
            .await
    }

    async fn read_direct(
        &self,
        cred: &Credential,
        ino: u64,
        fh: &FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FsError> {
        let rsize = self.session.rsize as u64;
        let end = offset.saturating_add(size as u64);
        let mut calls = Vec::new();
        let mut at = offset;
        let sent = Observed::Since(self.inodes.stamp());
        while at < end {
            let n = (end - at).min(rsize - at % rsize);
            calls.push(self.nfs.read(cred, fh, at, n as u32));
            at += n;
        }
        let replies = try_join_all(calls).await?;
        if let Some(a) = replies.last().and_then(|r| r.attr) {
            self.inodes.update_attr(ino, &a, sent);
        }
        if replies.len() == 1 {
            return Ok(replies
                .into_iter()
                .next()
                .map(|r| r.data)
                .unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(size as usize);
        for r in replies {
            let short = r.data.len() < r.count as usize || r.eof;
            out.extend_from_slice(&r.data);
            if short {
                break;
            }
        }
        Ok(out.freeze())
    }

    pub fn cache_stats(&self) -> pagecache::CacheStats {
        self.pages.stats()
    }

    /// What every write does first: refuse on a read-only mount, and drop
    /// the cached blocks the write will make stale: its own, and for a
    /// write past the end of the file the old last block, which is short
    /// and would read as the end of the file.
    fn begin_write(&self, ino: u64, offset: u64, len: usize) -> Result<inode::Inode, FsError> {
        self.writable()?;
        let inode = self.inodes.get(ino).ok_or(FsError::STALE)?;
        let cgen = inode.cache_gen;
        self.pages
            .invalidate_range(cgen, offset, offset + len as u64);
        self.pages.invalidate_end(cgen, inode.attr.size, offset);
        Ok(inode)
    }

    /// A buffered write; the first to learn of an earlier failed write of
    /// this descriptor's reports it instead.
    pub async fn write(
        &self,
        c: &Caller,
        ino: u64,
        handle: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32, FsError> {
        let inode = self.begin_write(ino, offset, data.len())?;
        self.unreported_error(ino, handle, true)?;
        let len = data.len() as u32;
        self.writeback
            .write(ino, &inode.fh, &self.cred(c), offset, data)
            .await?;
        Ok(len)
    }

    /// WRITE for a descriptor opened O_DIRECT: durable on the server before
    /// it returns, as the kernel client's direct I/O is, so another client
    /// reads it at once and its error is this write's to report.
    pub async fn write_through(
        &self,
        c: &Caller,
        ino: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32, FsError> {
        let inode = self.begin_write(ino, offset, data.len())?;
        let len = data.len() as u32;
        self.writeback
            .write_sync(ino, &inode.fh, &self.cred(c), offset, Bytes::from(data))
            .await?;
        Ok(len)
    }

    /// close(2) of one descriptor: make the data durable and report errors:
    /// this flush's own, else a failed write this descriptor has not
    /// reported (which waits for the next report when the flush fails).
    pub async fn flush(&self, ino: u64, handle: u64) -> Result<(), FsError> {
        if !self.may_have_written(handle) {
            return Ok(());
        }
        self.writeback.flush(ino).await?;
        self.unreported_error(ino, handle, false)
    }

    /// fsync(2) makes the whole file durable whichever descriptor asks, and
    /// reports the failed writes since it was opened also to a read-only
    /// one, as the kernel's fsync does (only its close stays silent).
    pub async fn fsync(&self, ino: u64, handle: u64) -> Result<(), FsError> {
        if self.may_have_written(handle) {
            return self.flush(ino, handle).await;
        }
        self.writeback.settle(ino, false).await?;
        self.unreported_error(ino, handle, false)
    }

    /// The last close of a descriptor. The kernel throws RELEASE's answer
    /// away, so it sends what FLUSH left (a writable mmap's pages) and takes
    /// no saved error: one FLUSH did not report stays for the next opener.
    /// The kernel sends RELEASE without the closer's identity (`_c` is
    /// root's), so nothing here is sent as the caller.
    pub async fn release(&self, _c: &Caller, ino: u64, handle: u64) -> Result<(), FsError> {
        let result = if self.may_have_written(handle) {
            self.writeback.flush(ino).await
        } else {
            Ok(())
        };
        if self.files.lock().remove(&handle).is_some() {
            self.open_files.fetch_sub(1, Ordering::Relaxed);
        }
        self.readahead.lock().remove(&handle);
        let silly = self
            .inodes
            .with(ino, |i| {
                i.open_count = i.open_count.saturating_sub(1);
                if i.open_count == 0 {
                    i.silly.take()
                } else {
                    None
                }
            })
            .flatten();
        if let Some((parent, name, cred)) = silly
            && let Ok(dir) = self.fh(parent)
        {
            match self.nfs.remove(&cred, &dir, &name).await {
                Ok(ok) => self.update_dir(parent, &ok.dir_wcc, &[DirChange::Removed(&name)]),
                Err(e) => {
                    self.unsure_of(&[parent]);
                    tracing::warn!(ino, name = ?name, error = %e, "could not remove silly-renamed file");
                }
            }
        }
        // Counted after the REMOVE: an open may have come in meanwhile.
        let last = self.inodes.with(ino, |i| i.open_count == 0).unwrap_or(true);
        self.writeback.release(ino, last);
        self.inodes.forget(ino, 0);
        result
    }

    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        self.inodes.get(ino).ok_or(FsError::STALE)?;
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(
            handle,
            DirStream {
                ino,
                verf: CookieVerf::default(),
                page: Vec::new(),
                eof: false,
            },
        );
        Ok(handle)
    }

    pub fn releasedir(&self, handle: u64) {
        let closed = self.dirs.lock().remove(&handle);
        if let Some(s) = closed {
            self.drop_unclaimed(&s.page);
        }
    }

    /// One READDIR(PLUS) page from `cookie`: its usable items, the new
    /// cookie verifier, eof, and the last cookie the server sent (to go on
    /// from when every name had to be left out). None when the server no
    /// longer knows the cookie (NFS3ERR_BAD_COOKIE).
    async fn fetch_dir_page(
        &self,
        cred: &Credential,
        ino: u64,
        dir: &FileHandle,
        cookie: u64,
        verf: CookieVerf,
        plus: bool,
    ) -> Result<Option<DirPage>, FsError> {
        let lost = |f: &crate::nfs::Failure<_>| {
            f.status() == Some(nfs3_types::nfs3::nfsstat3::NFS3ERR_BAD_COOKIE)
        };
        let dtpref = self.session.fsinfo.dtpref.clamp(4096, 64 << 10);
        let listed = |names: &mut dyn Iterator<Item = &[u8]>| {
            // Every name the server sent, usable or not: one we did not know
            // ends trust in a directory we thought complete.
            let mut known = self.known_dirs.lock();
            for name in names {
                known.listed(ino, name);
            }
        };
        if plus || self.cfg.rdirplus {
            let sent = Observed::Since(self.inodes.stamp());
            let page = self
                .nfs
                .readdirplus(cred, dir, cookie, verf, dtpref, dtpref * 4)
                .await;
            let page = match page {
                Err(f) if lost(&f) => return Ok(None),
                other => other?,
            };
            if let Some(a) = page.dir_attr {
                self.inodes.update_attr(ino, &a, sent);
            }
            listed(&mut page.entries.iter().map(|e| e.name.as_ref()));
            let last = page.entries.last().map(|e| e.cookie);
            let mut items = listable(ino, page.entries, |e| &e.name)
                .into_iter()
                .map(|e| {
                    let entry = match (&e.fh, &e.attr) {
                        (Some(fh), Some(a)) if !is_dot(&e.name) => {
                            let entry = self.entry_for(fh, a, 0, sent);
                            self.note_dentry(ino, &e.name, entry.ino);
                            Some(entry)
                        }
                        _ => None,
                    };
                    DirItem {
                        ino: self.inodes.ino_of(e.fileid),
                        kind: e.attr.map_or(FileType::Regular, |a| a.ftype),
                        name: e.name,
                        offset: e.cookie,
                        entry,
                    }
                })
                .collect::<Vec<_>>();
            // An entry sent without its handle or attributes (knfsd's for a
            // mount point below the export; ganesha's when fetching them
            // failed) is looked up: the kernel links every entry of a
            // READDIRPLUS answer by its inode number.
            for item in items
                .iter_mut()
                .filter(|i| i.entry.is_none() && !is_dot(&i.name))
            {
                let seen = Observed::Since(self.inodes.stamp());
                let Ok(found) = self.nfs.lookup(cred, dir, &item.name).await else {
                    continue;
                };
                // No kernel lookup counted: claim_listed counts what goes out.
                let named = self.named_entry(cred, ino, &item.name, &found.fh, found.attr, seen, 0);
                if let Ok(entry) = named.await {
                    item.kind = entry.attr.ftype;
                    item.entry = Some(entry);
                }
            }
            Ok(Some((items, page.cookieverf, page.eof, last)))
        } else {
            let page = match self.nfs.readdir(cred, dir, cookie, verf, dtpref).await {
                Err(f) if lost(&f) => return Ok(None),
                other => other?,
            };
            listed(&mut page.entries.iter().map(|e| e.name.as_ref()));
            let last = page.entries.last().map(|e| e.cookie);
            let items = listable(ino, page.entries, |e| &e.name)
                .into_iter()
                .map(|e| DirItem {
                    ino: self.inodes.ino_of(e.fileid),
                    name: e.name,
                    kind: FileType::Regular,
                    offset: e.cookie,
                    entry: None,
                })
                .collect();
            Ok(Some((items, page.cookieverf, page.eof, last)))
        }
    }

    /// Drops the table entries a READDIRPLUS page made that the kernel never
    /// took (no lookup count) and nothing holds open, unless a page still
    /// cached for an open directory lists them. They stay while a page may
    /// yet hand them over: a kernel buffer takes a few dozen of a page's
    /// hundreds, and the rest go out from the cached page, by inode number,
    /// in the next calls.
    fn drop_unclaimed(&self, page: &[DirItem]) {
        if page.iter().all(|i| i.entry.is_none()) {
            return;
        }
        // Held throughout, so no page can be stored meanwhile and list an
        // entry dropped here.
        let dirs = self.dirs.lock();
        let listed: std::collections::HashSet<u64> = dirs
            .values()
            .flat_map(|d| d.page.iter())
            .filter_map(|i| i.entry.as_ref().map(|e| e.ino))
            .collect();
        for e in page.iter().filter_map(|i| i.entry.as_ref()) {
            if !listed.contains(&e.ino) {
                self.inodes.forget(e.ino, 0);
            }
        }
    }

    /// Entries after `offset` (0: the start). With `plus`, each item carries
    /// attributes; the caller must report which it handed to the kernel with
    /// [`NfsFs::claim_listed`] so lookup counts stay right.
    async fn readdir_once(
        &self,
        c: &Caller,
        handle: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Vec<DirItem>, FsError> {
        let (ino, verf, cached) = {
            let dirs = self.dirs.lock();
            let s = dirs.get(&handle).ok_or(FsError::BADF)?;
            let cached = if offset == 0 {
                None
            } else {
                s.page
                    .iter()
                    .position(|i| i.offset == offset)
                    // No kernel buffer takes more (the next call goes on
                    // from the last one it took).
                    .map(|p| {
                        let rest = &s.page[p + 1..];
                        (rest[..rest.len().min(REPLY_ITEMS_MAX)].to_vec(), s.eof)
                    })
            };
            (s.ino, s.verf, cached)
        };
        match cached {
            // Under READDIRPLUS each entry must still be in the table: the
            // kernel gets them by inode number.
            Some((rest, _))
                if !rest.is_empty()
                    && (!plus
                        || rest.iter().all(|i| match &i.entry {
                            Some(e) => self.inodes.with(e.ino, |_| ()).is_some(),
                            None => is_dot(&i.name),
                        })) =>
            {
                // The page was fetched earlier: give the kernel today's attributes.
                let mut rest = rest;
                for item in rest.iter_mut() {
                    if let Some(e) = item.entry.as_mut() {
                        e.attr = self.current_attr(e.ino, e.attr);
                    }
                }
                return Ok(rest);
            }
            // The rest of a last page is fetched again when it cannot be
            // used as it is, or the listing would end short.
            Some((rest, true)) if rest.is_empty() => return Ok(Vec::new()),
            _ => {}
        }
        let dir = self.fh(ino)?;
        let cred = self.cred(c);
        let (mut cookie, mut verf) = match offset {
            0 => (0, CookieVerf::default()),
            _ => (offset, verf),
        };
        let mut skipped_pages = 0;
        // Set when the server lost our place: the offset to go on after,
        // looked for from the top of the listing (once per call).
        let mut resume_after: Option<u64> = None;
        let mut restarted = false;
        // Entries read on the way to it, with the page this one replaces:
        // dropped once this page is stored.
        let mut read_past: Vec<DirItem> = Vec::new();
        // A server that never moves on must not keep us here.
        let mut advance = |last: u64, cookie: u64| {
            skipped_pages += 1;
            if last == cookie || skipped_pages > 1000 {
                tracing::warn!(dir = ino, cookie, "server's listing does not advance");
                return Err(FsError::IO);
            }
            Ok(())
        };
        let (items, new_verf, eof) = loop {
            let Some((mut items, new_verf, eof, last)) = self
                .fetch_dir_page(&cred, ino, &dir, cookie, verf, plus)
                .await?
            else {
                // The directory changed under the listing (or the server
                // restarted) and its cookie is gone. Like the kernel
                // client, start again from the top and go on after the
                // entry the kernel saw last; the kernel client ends the
                // listing when that fails, and so do we.
                if cookie == 0 || restarted {
                    tracing::warn!(
                        dir = ino,
                        "server refused the listing's cookie again; ending it here"
                    );
                    self.drop_unclaimed(&read_past);
                    return Ok(Vec::new());
                }
                tracing::warn!(
                    dir = ino,
                    cookie,
                    "server lost the listing's place (BAD_COOKIE); finding it again from the top"
                );
                restarted = true;
                resume_after = (offset != 0).then_some(offset);
                (cookie, verf) = (0, CookieVerf::default());
                continue;
            };
            if let Some(after) = resume_after {
                let seen = items.iter().position(|i| i.offset == after);
                match seen {
                    Some(p) => read_past.extend(items.drain(..=p)),
                    None => read_past.append(&mut items),
                }
                match (seen, last) {
                    (Some(_), _) => resume_after = None,
                    (None, Some(last)) if !eof => {
                        advance(last, cookie)?;
                        (cookie, verf) = (last, new_verf);
                        continue;
                    }
                    // Gone from the listing: it ends here, as the kernel
                    // client's does.
                    (None, _) => {
                        self.drop_unclaimed(&read_past);
                        return Ok(Vec::new());
                    }
                }
            }
            match last {
                // A page whose every name had to be left out (or that held
                // only what the kernel has seen) is not the end.
                Some(last) if items.is_empty() && !eof => {
                    advance(last, cookie)?;
                    (cookie, verf) = (last, new_verf);
                }
                _ => break (items, new_verf, eof),
            }
        };
        let replaced = self.dirs.lock().get_mut(&handle).map(|s| {
            s.verf = new_verf;
            s.eof = eof;
            std::mem::replace(&mut s.page, items.clone())
        });
        read_past.extend(replaced.into_iter().flatten());
        self.drop_unclaimed(&read_past);
        Ok(items)
    }

    /// Counts a kernel reference for an entry READDIRPLUS is about to hand
    /// over; false if the entry is no longer in the table (see
    /// [`Self::drop_unclaimed`]), and then it must not be handed over.
    pub fn claim_listed(&self, ino: u64) -> bool {
        self.inodes.with(ino, |i| i.nlookup += 1).is_some()
    }

    /// Takes back [`Self::claim_listed`] for an entry that did not fit. It
    /// stays in the table for the next call, which serves it from the
    /// cached page.
    pub fn unclaim_listed(&self, ino: u64) {
        self.inodes
            .with(ino, |i| i.nlookup = i.nlookup.saturating_sub(1));
    }

    async fn statfs_once(&self, c: &Caller) -> Result<StatFs, FsError> {
        let st = self.nfs.fsstat(&self.cred(c), &self.fh(ROOT_INO)?).await?;
        let bsize = 4096u64;
        Ok(StatFs {
            blocks: st.tbytes / bsize,
            bfree: st.fbytes / bsize,
            bavail: st.abytes / bsize,
            files: st.tfiles,
            ffree: st.afiles,
            bsize: bsize as u32,
            namelen: NAME_MAX as u32,
        })
    }

    /// access(2): the server is the authority, through ACCESS.
    async fn access_once(&self, c: &Caller, ino: u64, mask: i32) -> Result<(), FsError> {
        if mask == libc::F_OK {
            return self.fh(ino).map(|_| ());
        }
        let inode = self.inodes.get(ino).ok_or(FsError::STALE)?;
        let is_dir = inode.attr.ftype == FileType::Directory;
        let mut want = 0u32;
        if mask & libc::R_OK != 0 {
            want |= nfs3_types::nfs3::ACCESS3_READ;
        }
        if mask & libc::W_OK != 0 {
            if self.cfg.read_only {
                return Err(FsError::ROFS);
            }
            want |= nfs3_types::nfs3::ACCESS3_MODIFY
                | if is_dir {
                    nfs3_types::nfs3::ACCESS3_EXTEND | nfs3_types::nfs3::ACCESS3_DELETE
                } else {
                    nfs3_types::nfs3::ACCESS3_EXTEND
                };
        }
        if mask & libc::X_OK != 0 {
            want |= if is_dir {
                nfs3_types::nfs3::ACCESS3_LOOKUP
            } else {
                nfs3_types::nfs3::ACCESS3_EXECUTE
            };
        }
        let sent = Observed::Since(self.inodes.stamp());
        let ok = self.nfs.access(&self.cred(c), &inode.fh, want).await?;
        if let Some(a) = ok.attr {
            self.inodes.update_attr(ino, &a, sent);
        }
        if ok.access & want == want {
            Ok(())
        } else {
            Err(FsError(libc::EACCES))
        }
    }

    /// Makes all written data durable; used at unmount.
    pub async fn flush_all(&self) -> Result<(), FsError> {
        // Also files no longer open whose close could not flush them.
        let mut inos: Vec<u64> = self.files.lock().values().map(|f| f.ino).collect();
        inos.extend(self.writeback.inos());
        inos.sort_unstable();
        inos.dedup();
        let mut first = Ok(());
        for ino in inos {
            let flushed = self.writeback.flush(ino).await;
            let unreported = self
                .writeback
                .take_error(ino, None, true)
                .map_or(Ok(()), Err);
            if let Err(e) = flushed.and(unreported) {
                first = first.and(Err(e));
            }
        }
        first
    }

    pub fn writeback(&self) -> &Arc<WriteBack> {
        &self.writeback
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_markers_are_cut_to_what_the_server_keeps() {
        let step = |seconds, nseconds| marker_step(NfsTime { seconds, nseconds });
        assert_eq!(step(0, 0), Some(1000));
        assert_eq!(step(0, 1), Some(1000));
        assert_eq!(step(0, 100), Some(1000), "ganesha's 100 ns");
        assert_eq!(step(0, 300), Some(1200));
        assert_eq!(step(0, 1_000_000), Some(1_000_000), "memfs's 1 ms");
        assert_eq!(step(0, 1_000_001), None);
        assert_eq!(step(1, 0), None, "whole seconds: EXCLUSIVE instead");
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789);
        let m = exclusive_marker(at, 1200);
        assert_eq!((m.seconds, m.nseconds), (1_800_000_000, 123_456_000));
        assert_eq!(exclusive_marker(at, 1_000_000).nseconds, 123_000_000);
    }
}
