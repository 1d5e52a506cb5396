//! The thin fuser adapter. Each request is first polled on the FUSE thread
//! that read it, so what the caches answer needs no other thread; one that
//! has to wait is finished by a tokio task, so a slow NFS call never holds
//! up other requests (`FuseAdapter::answer`). Errors become errno in one
//! place ([`crate::fs::errno`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tracing::debug;

use crate::fs::{Caller, Entry, FsError, NfsFs, SetAttrs, TimeSet};
use crate::nfs::{Fattr, FileType};

/// FUSE requests are capped at 1 MiB (the kernel's default max_pages).
pub const MAX_WRITE: u32 = 1 << 20;

pub struct FuseAdapter {
    fs: Arc<NfsFs>,
    rt: Handle,
    /// Set once the runtime is shutting down; see [`FuseAdapter::closing`].
    closing: Arc<AtomicBool>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<NfsFs>, rt: Handle) -> Self {
        Self {
            fs,
            rt,
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag to raise before the runtime shuts down. Requests that arrive
    /// later are refused (the kernel sees EIO) instead of polled against a
    /// runtime that would panic on their timers, and parked ones woken
    /// then are leaked rather than dropped inside the waker's caller.
    pub fn closing(&self) -> Arc<AtomicBool> {
        self.closing.clone()
    }

    /// Answers a request. The future is polled once right here on the FUSE
    /// thread: what the caches serve alone (a cached lookup or attribute, a
    /// block already read ahead, a buffered write, a close with nothing to
    /// send) then costs no wake-up of another thread, which is most of a
    /// FUSE round trip's price on a small machine, and a call to the server
    /// is on its way before any other thread runs. A request that has to
    /// wait is parked ([`Parked`]) rather than spawned.
    fn answer(&self, request: impl Future<Output = ()> + Send + 'static) {
        run_first_here(&self.rt, &self.closing, request);
    }
}

/// [`FuseAdapter::answer`]'s work, apart from the filesystem so that tests
/// can drive it with any future.
fn run_first_here(
    rt: &Handle,
    closing: &Arc<AtomicBool>,
    request: impl Future<Output = ()> + Send + 'static,
) {
    if closing.load(Ordering::Acquire) {
        return; // dropping the unpolled request answers EIO
    }
    let parked = Arc::new(Parked {
        state: Mutex::new(ParkState::Polling),
        rt: rt.clone(),
        closing: closing.clone(),
    });
    let waker = Waker::from(parked.clone());
    // Inside the runtime's context, so timers, I/O and spawns in the
    // first poll register with it as they would on a worker.
    let _rt = rt.enter();
    // Boxed before the first poll: the future may leave pointers to
    // itself in wait lists, so it must not move when it is handed over.
    let mut request: PinnedRequest = Box::pin(request);
    // A panic in the filesystem must not take the FUSE thread with it
    // (a spawned task's panic would have stayed in that task).
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        request.as_mut().poll(&mut Context::from_waker(&waker))
    }));
    match polled {
        Ok(Poll::Ready(())) => return,
        Ok(Poll::Pending) => {}
        Err(_) => {
            tracing::error!("a FUSE request handler panicked; answered EIO");
            return;
        }
    }
    let mut state = parked.state.lock();
    if matches!(*state, ParkState::Woken) {
        *state = ParkState::Spawned;
        drop(state);
        rt.spawn(request);
    } else {
        *state = ParkState::Waiting(request);
    }
}

type PinnedRequest = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A request that went pending on its inline poll. It is held only by the
/// wakers it registered, and the first wake hands it to the runtime. That
/// wake usually comes from a worker (the RPC reader routing a reply), which
/// queues it locally: no thread is woken just to find the request still
/// waiting, as an immediate `spawn` from the FUSE thread would do.
struct Parked {
    state: Mutex<ParkState>,
    rt: Handle,
    closing: Arc<AtomicBool>,
}

enum ParkState {
    /// The first poll is running on the FUSE thread.
    Polling,
    /// Woken while the first poll ran: spawn as soon as it returns.
    Woken,
    Waiting(PinnedRequest),
    /// Owned by the runtime now, which polls it with its own waker.
    Spawned,
}

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, ParkState::Spawned) {
            ParkState::Polling | ParkState::Woken => *state = ParkState::Woken,
            ParkState::Waiting(request) => {
                drop(state);
                if self.closing.load(Ordering::Acquire) {
                    // A shut-down runtime would drop it right here, and the
                    // waker's caller may hold a lock that its drop takes.
                    std::mem::forget(request);
                } else {
                    self.rt.spawn(request);
                }
            }
            ParkState::Spawned => {}
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// A read-only descriptor's close needs no FLUSH round trip (FOPEN_NOFLUSH;
/// kernels before 5.17 ignore it and send one, which we answer at once).
fn open_flags(o: &crate::fs::Opened) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if o.keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if o.read_only {
        f |= FopenFlags::FOPEN_NOFLUSH;
    }
    f
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.0)
}

fn kind(t: FileType) -> fuser::FileType {
    match t {
        FileType::Regular => fuser::FileType::RegularFile,
        FileType::Directory => fuser::FileType::Directory,
        FileType::Block => fuser::FileType::BlockDevice,
        FileType::Char => fuser::FileType::CharDevice,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Socket => fuser::FileType::Socket,
        FileType::Fifo => fuser::FileType::NamedPipe,
    }
}

pub fn file_attr(ino: u64, a: &Fattr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.used.div_ceil(512),
        atime: a.atime.to_system_time(),
        mtime: a.mtime.to_system_time(),
        ctime: a.ctime.to_system_time(),
        crtime: SystemTime::UNIX_EPOCH,
        kind: kind(a.ftype),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: nix::sys::stat::makedev(a.rdev.0 as u64, a.rdev.1 as u64) as u32,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Entry, FsError>) {
    match r {
        Ok(e) => reply.entry_with_ttls(
            &e.attr_ttl,
            &e.entry_ttl,
            &file_attr(e.ino, &e.attr),
            Generation(e.generation),
        ),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn time_set(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(t),
    })
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        if let Err(max) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let mut wanted = vec![
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_MAX_PAGES,
            // Clearing setuid/setgid on chown and write is left to the
            // server, as the kernel client leaves it. Without this the kernel
            // sends a GETATTR before every chown, and before another user's
            // write to a setuid file a SETATTR of the mode as that user,
            // which the server refuses (EPERM) unless the writer owns it.
            InitFlags::FUSE_HANDLE_KILLPRIV,
        ];
        if self.fs.config().rdirplus {
            wanted.push(InitFlags::FUSE_DO_READDIRPLUS);
            wanted.push(InitFlags::FUSE_READDIRPLUS_AUTO);
        }
        for flag in wanted {
            if config.add_capabilities(flag).is_err() {
                debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, c, name) = (self.fs.clone(), caller(req), name.as_bytes().to_vec());
        self.answer(async move {
            match fs.lookup(&c, parent.0, &name).await {
                Err(FsError(libc::ENOENT)) if !fs.negative_ttl().is_zero() => {
                    // A negative entry (inode 0) lets the kernel cache "absent".
                    let mut attr = file_attr(0, &fs.session().root_attr);
                    attr.ino = INodeNo(0);
                    reply.entry(&fs.negative_ttl(), &attr, Generation(0));
                }
                r => reply_entry(reply, r),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move {
            match fs.getattr(&c, ino.0).await {
                Ok((a, ttl)) => reply.attr(&ttl, &file_attr(ino.0, &a)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        let set = SetAttrs {
            mode,
            uid,
            gid,
            size,
            atime: time_set(atime),
            mtime: time_set(mtime),
        };
        self.answer(async move {
            match fs.setattr(&c, ino.0, set).await {
                Ok((a, ttl)) => reply.attr(&ttl, &file_attr(ino.0, &a)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move {
            match fs.readlink(&c, ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (fs, c, name) = (self.fs.clone(), caller(req), name.as_bytes().to_vec());
        self.answer(async move {
            reply_entry(
                reply,
                fs.mknod(&c, parent.0, &name, mode & !umask, rdev).await,
            );
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (fs, c, name) = (self.fs.clone(), caller(req), name.as_bytes().to_vec());
        self.answer(async move {
            reply_entry(reply, fs.mkdir(&c, parent.0, &name, mode & !umask).await);
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, c, name) = (self.fs.clone(), caller(req), name.as_bytes().to_vec());
        self.answer(async move { reply_empty(reply, fs.unlink(&c, parent.0, &name).await) });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, c, name) = (self.fs.clone(), caller(req), name.as_bytes().to_vec());
        self.answer(async move { reply_empty(reply, fs.rmdir(&c, parent.0, &name).await) });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        let (name, target) = (
            link_name.as_bytes().to_vec(),
            target.as_os_str().as_bytes().to_vec(),
        );
        self.answer(async move {
            reply_entry(reply, fs.symlink(&c, parent.0, &name, &target).await);
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.answer(async move {
            let r = fs
                .rename(&c, parent.0, &name, newparent.0, &newname, flags.bits())
                .await;
            reply_empty(reply, r);
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (fs, c, name) = (self.fs.clone(), caller(req), newname.as_bytes().to_vec());
        self.answer(async move {
            reply_entry(reply, fs.link(&c, ino.0, newparent.0, &name).await);
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move {
            match fs.open(&c, ino.0, flags.0).await {
                Ok(o) => reply.opened(FileHandle(o.fh), open_flags(&o)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        // The descriptor's current flags: fcntl(F_SETFL) may have changed them.
        let direct = flags.0 & libc::O_DIRECT != 0;
        self.answer(async move {
            let data = if direct {
                fs.read_uncached(&c, ino.0, offset, size).await
            } else {
                fs.read(&c, ino.0, fh.0, offset, size).await
            };
            match data {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (fs, c, data) = (self.fs.clone(), caller(req), data.to_vec());
        let direct = flags.0 & libc::O_DIRECT != 0;
        self.answer(async move {
            let written = if direct {
                fs.write_through(&c, ino.0, offset, data).await
            } else {
                fs.write(&c, ino.0, fh.0, offset, data).await
            };
            match written {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close(2) of a shared descriptor flushes, a forked child's
        // too, and the first takes the write error: the pid says whose.
        tracing::debug!(ino = ino.0, fh = fh.0, pid = req.pid(), "flush");
        let fs = self.fs.clone();
        self.answer(async move { reply_empty(reply, fs.flush(ino.0, fh.0).await) });
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move { reply_empty(reply, fs.release(&c, ino.0, fh.0).await) });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.answer(async move { reply_empty(reply, fs.fsync(ino.0, fh.0).await) });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(h) => reply.opened(FileHandle(h), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move {
            match fs.readdir(&c, fh.0, offset, false).await {
                Ok(items) => {
                    for i in items {
                        if reply.add(
                            INodeNo(i.ino),
                            i.offset,
                            kind(i.kind),
                            OsStr::from_bytes(&i.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdirplus(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move {
            // An entry is counted as the kernel's before it goes into the
            // reply, so no cleanup can drop it in between. One that is gone
            // already (another listing's cleanup raced its page) ends this
            // reply; an empty reply would mean "end of directory", so the
            // page is fetched again instead.
            for _ in 0..3 {
                let items = match fs.readdir(&c, fh.0, offset, true).await {
                    Ok(items) => items,
                    Err(e) => return reply.error(errno(e)),
                };
                let mut added = 0;
                let mut lost = false;
                for i in items {
                    let (attr, ttl, generation) = match &i.entry {
                        Some(e) => {
                            if !fs.claim_listed(e.ino) {
                                lost = true;
                                break;
                            }
                            (
                                file_attr(e.ino, &e.attr),
                                e.entry_ttl.min(e.attr_ttl),
                                e.generation,
                            )
                        }
                        // "." and "..", which the kernel does not link.
                        None => {
                            let mut a = file_attr(i.ino, &fs.session().root_attr);
                            a.kind = kind(i.kind);
                            (a, Duration::ZERO, 0)
                        }
                    };
                    if reply.add(
                        INodeNo(attr.ino.0),
                        i.offset,
                        OsStr::from_bytes(&i.name),
                        &ttl,
                        &attr,
                        Generation(generation),
                    ) {
                        if let Some(e) = &i.entry {
                            fs.unclaim_listed(e.ino);
                        }
                        break;
                    }
                    added += 1;
                }
                if added > 0 || !lost {
                    return reply.ok();
                }
            }
            reply.error(errno(FsError::STALE));
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory operations are synchronous on an NFSv3 server.
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move {
            match fs.statfs(&c).await {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
                ),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let (fs, c) = (self.fs.clone(), caller(req));
        self.answer(async move { reply_empty(reply, fs.access(&c, ino.0, mask.bits()).await) });
    }

    // NFSv3 has no extended attributes. ENOSYS makes the kernel stop asking
    // (and report EOPNOTSUPP to callers) instead of logging every probe.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fs, c, name) = (self.fs.clone(), caller(req), name.as_bytes().to_vec());
        self.answer(async move {
            match fs.create(&c, parent.0, &name, mode & !umask, flags).await {
                // One TTL for both here (fuser's CREATE reply has no
                // second): the shorter, so the new file's attributes are not
                // kept past the attribute cache's lifetime.
                Ok((e, o)) => reply.created(
                    &e.entry_ttl.min(e.attr_ttl),
                    &file_attr(e.ino, &e.attr),
                    Generation(e.generation),
                    FileHandle(o.fh),
                    open_flags(&o),
                ),
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-worker")
            .enable_all()
            .build()
            .unwrap()
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    #[test]
    fn a_request_that_need_not_wait_is_answered_on_the_calling_thread() {
        let rt = runtime();
        let (tx, rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        run_first_here(rt.handle(), &closing, async move {
            tx.send(thread_name()).unwrap();
        });
        // Answered before run_first_here returned, on this thread.
        assert_eq!(rx.try_recv().unwrap(), thread_name());
    }

    #[test]
    fn a_waiting_request_is_finished_by_the_runtime_after_its_wake() {
        let rt = runtime();
        let (done_tx, done_rx) = mpsc::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let closing = Arc::new(AtomicBool::new(false));
        run_first_here(rt.handle(), &closing, async move {
            go_rx.await.unwrap();
            done_tx.send(thread_name()).unwrap();
        });
        assert!(done_rx.try_recv().is_err(), "finished before its wake");
        // The wake comes from a runtime task, as a routed RPC reply does.
        rt.spawn(async move { go_tx.send(()).unwrap() });
        let ran_on = done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("never finished");
        assert_eq!(ran_on, "test-worker");
    }

    #[test]
    fn a_request_woken_during_its_first_poll_is_not_lost() {
        let rt = runtime();
        let (done_tx, done_rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        let mut first = true;
        run_first_here(
            rt.handle(),
            &closing,
            std::future::poll_fn(move |cx| {
                if std::mem::take(&mut first) {
                    // Woken before the first poll has even returned.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                done_tx.send(()).unwrap();
                Poll::Ready(())
            }),
        );
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the wake was lost");
    }

    #[test]
    fn a_panicking_request_leaves_the_calling_thread_running() {
        let rt = runtime();
        let closing = Arc::new(AtomicBool::new(false));
        run_first_here(rt.handle(), &closing, async { panic!("handler bug") });
        let (tx, rx) = mpsc::channel();
        run_first_here(rt.handle(), &closing, async move { tx.send(()).unwrap() });
        rx.try_recv().expect("the next request was answered");
    }

    #[test]
    fn requests_after_closing_are_dropped_unpolled() {
        let rt = runtime();
        let closing = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel::<()>();
        run_first_here(rt.handle(), &closing, async move { tx.send(()).unwrap() });
        // Dropped without running: the sender is gone and nothing was sent.
        assert_eq!(rx.try_recv(), Err(mpsc::TryRecvError::Disconnected));
    }
}
