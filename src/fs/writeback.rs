//! Write-back: gathers writes into wsize chunks, sends them UNSTABLE with many
//! in flight, and keeps each chunk until a COMMIT with a matching verifier
//! proves it durable. A verifier change (the server restarted and lost
//! uncommitted data) makes us send those chunks again, FILE_SYNC.
//!
//! Dirty plus uncommitted memory is bounded by a byte semaphore; a writer that
//! hits the bound waits, and the wait kicks a commit so the bound frees up.
//!
//! A chunk never holds bytes a later write replaced: accepting a write trims
//! them out of the uncommitted chunks, and waits first for any WRITE of
//! those bytes still on the wire. So no two WRITEs of one byte are ever in
//! flight together (the server could apply them in either order), and a
//! resend after a verifier change cannot put old data over new.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::errno::FsError;
use crate::nfs::{FileHandle, NfsClient, StableHow, Wcc, WriteVerf};
use crate::rpc::Credential;

/// Gathered data older than this is sent even if the chunk is not full
/// (the default; [`WriteBack::new`] takes the mount's value).
pub const GATHER_AGE: Duration = Duration::from_millis(200);
/// Sent-but-uncommitted data older than this is committed in the background.
const COMMIT_AGE: Duration = Duration::from_secs(5);

struct Chunk {
    offset: u64,
    data: Bytes,
    verf: WriteVerf,
    /// Send again whatever the next COMMIT's verifier says: a resend after a
    /// verifier change failed, or the server's verifier changed between the
    /// pieces of a short-written chunk.
    resend: bool,
    /// In the batch a COMMIT now on the wire covers.
    committing: bool,
    /// The budget this chunk's bytes hold; the second piece of a chunk a
    /// later write cut in two holds none (the first piece's covers it).
    _permit: Option<OwnedSemaphorePermit>,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    /// What is left of this chunk once [from, to) is written anew: nothing,
    /// itself, or one or two pieces around the hole.
    fn trim(self, from: u64, to: u64) -> Vec<Chunk> {
        let (start, end) = (self.offset, self.end());
        if to <= start || end <= from {
            return vec![self];
        }
        let mut pieces = Vec::new();
        let mut permit = self._permit;
        let piece = |offset: u64, data: Bytes, permit: Option<OwnedSemaphorePermit>| Chunk {
            offset,
            data,
            verf: self.verf,
            resend: self.resend,
            committing: self.committing,
            _permit: permit,
        };
        if start < from {
            let data = self.data.slice(..(from - start) as usize);
            pieces.push(piece(start, data, None));
        }
        if to < end {
            let data = self.data.slice((to - start) as usize..);
            // Each piece holds its own share of the budget, so freeing one
            // cannot leave the other's bytes uncounted.
            let share = match (&mut permit, pieces.is_empty()) {
                (Some(p), false) => p.split(data.len().min(p.num_permits())),
                (p, _) => p.take(),
            };
            pieces.push(piece(to, data, share));
        }
        if let Some(first) = pieces.first_mut().filter(|c| c._permit.is_none()) {
            first._permit = permit;
        }
        pieces
    }
}

struct Gather {
    offset: u64,
    buf: BytesMut,
    since: Instant,
    permit: OwnedSemaphorePermit,
}

impl Gather {
    fn end(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    fn overlaps(&self, from: u64, to: u64) -> bool {
        self.offset < to && from < self.end()
    }

    /// Whether a write of [from, to) can be laid into this buffer: it starts
    /// inside it or right after it, and the result stays within `wsize`.
    fn can_take(&self, from: u64, to: u64, wsize: usize) -> bool {
        self.offset <= from
            && from <= self.end()
            && to.max(self.end()) - self.offset <= wsize as u64
    }

    fn put(&mut self, from: u64, data: &[u8]) {
        let at = (from - self.offset) as usize;
        let over = (self.buf.len() - at).min(data.len());
        self.buf[at..at + over].copy_from_slice(&data[..over]);
        self.buf.extend_from_slice(&data[over..]);
    }
}

/// A failed write, kept the way the kernel's errseq_t keeps one: its stamp
/// comes from one counter, and each descriptor remembers the stamp it last
/// reported (or the counter when it was opened), so every descriptor that
/// was open when the write failed reports it, once to its next write and
/// once to its next fsync or close, and a descriptor opened later does not.
/// An error no close or fsync has reported yet goes to the next opener.
#[derive(Debug, Clone, Copy)]
struct WriteError {
    stamp: u64,
    error: FsError,
    reported: bool,
}

#[derive(Default)]
struct State {
    gather: Option<Gather>,
    /// WRITEs on the wire: gathered chunks and resends.
    inflight: usize,
    /// The byte ranges of those WRITEs; a write of any of these bytes waits.
    sending: Vec<(u64, u64)>,
    /// Sent, not yet known durable; none holds bytes a later write replaced.
    uncommitted: Vec<Chunk>,
    oldest_uncommitted: Option<Instant>,
    /// The latest write that failed, for every descriptor open at the time
    /// to report (see [`WriteError`]).
    error: Option<WriteError>,
    /// Highest byte offset written through us, for getattr while dirty.
    end: u64,
    cred: Option<Credential>,
}

impl State {
    /// Takes the gathered chunk out to be sent, counting it on the wire.
    fn take_gather(&mut self) -> Option<Gather> {
        let g = self.gather.take()?;
        self.inflight += 1;
        self.sending.push((g.offset, g.end()));
        Some(g)
    }

    fn is_sending(&self, from: u64, to: u64) -> bool {
        self.sending.iter().any(|&(a, b)| a < to && from < b)
    }

    /// A WRITE of [from, to) is off the wire.
    fn sent(&mut self, from: u64, to: u64) {
        if let Some(i) = self.sending.iter().position(|&r| r == (from, to)) {
            self.sending.swap_remove(i);
        }
        self.inflight -= 1;
    }

    /// [from, to) is being written anew: no uncommitted chunk may send its
    /// old bytes again (after a verifier change) over the new ones.
    fn supersede(&mut self, from: u64, to: u64) {
        if self
            .uncommitted
            .iter()
            .any(|c| c.offset < to && from < c.end())
        {
            let old = std::mem::take(&mut self.uncommitted);
            self.uncommitted = old.into_iter().flat_map(|c| c.trim(from, to)).collect();
        }
    }

    /// Accepts a write whose bytes are on the wire nowhere; returns the
    /// chunks to send now.
    fn accept(
        &mut self,
        offset: u64,
        data: Vec<u8>,
        permit: OwnedSemaphorePermit,
        wsize: usize,
    ) -> Vec<Gather> {
        let end = offset + data.len() as u64;
        self.end = self.end.max(end);
        self.supersede(offset, end);
        let mut sends = Vec::new();
        match &mut self.gather {
            Some(g) if g.can_take(offset, end, wsize) => {
                g.put(offset, &data);
                g.permit.merge(permit);
            }
            _ => {
                sends.extend(self.take_gather());
                // A full-sized write becomes the chunk as it is, without a copy.
                let buf = if data.len() >= wsize {
                    BytesMut::from(Bytes::from(data))
                } else {
                    let mut b = BytesMut::with_capacity(wsize);
                    b.extend_from_slice(&data);
                    b
                };
                self.gather = Some(Gather {
                    offset,
                    buf,
                    since: Instant::now(),
                    permit,
                });
            }
        }
        if self.gather.as_ref().is_some_and(|g| g.buf.len() >= wsize) {
            sends.extend(self.take_gather());
        }
        sends
    }

    fn has_pending(&self) -> bool {
        self.gather.is_some() || self.inflight > 0 || !self.uncommitted.is_empty()
    }
}

/// Errors after which sending the same bytes again cannot succeed without
/// someone acting first (the file is gone, the server refuses or is full):
/// the data is dropped and the error kept for the writers to report, as the
/// kernel client does, rather than held (with its share of the dirty
/// budget) and retried forever.
fn is_final(e: FsError) -> bool {
    matches!(
        e.0,
        libc::ESTALE
            | libc::EROFS
            | libc::EACCES
            | libc::EPERM
            | libc::ENOSPC
            | libc::EDQUOT
            | libc::EFBIG
    )
}

struct FileWrites {
    fh: FileHandle,
    state: Mutex<State>,
    idle: Notify,
    /// Woken whenever a WRITE leaves the wire, for writers waiting on its bytes.
    sent: Arc<Notify>,
    /// Serialises commits so a flush waits for a background commit's outcome.
    commit_lock: tokio::sync::Mutex<()>,
}

impl FileWrites {
    /// Resolves when the next WRITE leaves the wire. Called under the state
    /// lock: it is enabled here, so that wake-up cannot be missed.
    fn next_sent(&self) -> std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>> {
        let mut sent = Box::pin(self.sent.clone().notified_owned());
        sent.as_mut().enable();
        sent
    }
}

/// Observer of WRITE and COMMIT replies, so the filesystem can track its own
/// changes through wcc_data without invalidating its caches, and drop what
/// a read that raced a WRITE cached of the bytes it replaced: (inode, wcc,
/// the byte range a WRITE wrote).
pub type WccSink = Arc<dyn Fn(u64, &Wcc, Option<(u64, u64)>) + Send + Sync>;

/// How a chunk's WRITEs went.
struct Sent {
    verf: WriteVerf,
    how: StableHow,
    /// The server's verifier changed between the chunk's pieces.
    mixed: bool,
}

pub struct WriteBack {
    nfs: NfsClient,
    wsize: usize,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    files: Mutex<HashMap<u64, Arc<FileWrites>>>,
    wcc_sink: WccSink,
    pressure: Notify,
    /// Chunks sent again because the server's write verifier changed.
    resent: std::sync::atomic::AtomicU64,
    gather_age: Duration,
    /// Source of [`WriteError`] stamps.
    error_stamps: std::sync::atomic::AtomicU64,
}

impl WriteBack {
    pub fn new(
        nfs: NfsClient,
        wsize: u32,
        dirty_limit: usize,
        gather_age: Duration,
        wcc_sink: WccSink,
    ) -> Arc<Self> {
        let budget_bytes = dirty_limit.max(2 * wsize as usize);
        let wb = Arc::new(Self {
            nfs,
            wsize: wsize as usize,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            files: Mutex::new(HashMap::new()),
            wcc_sink,
            pressure: Notify::new(),
            resent: std::sync::atomic::AtomicU64::new(0),
            gather_age,
            error_stamps: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(Self::flusher(Arc::downgrade(&wb)));
        wb
    }

    /// The write state of `ino`. The server may give a removed file's
    /// fileid to a new file: state kept for the old handle (an unreported
    /// error, data the server will refuse as stale) is not the new file's.
    /// The caller holds the map's lock, so that `release` cannot drop the
    /// state between this lookup and the caller's change to it.
    fn file_in(
        files: &mut HashMap<u64, Arc<FileWrites>>,
        ino: u64,
        fh: &FileHandle,
    ) -> Arc<FileWrites> {
        match files.get(&ino) {
            Some(f) if f.fh == *fh => f.clone(),
            _ => {
                let f = Arc::new(FileWrites {
                    fh: fh.clone(),
                    state: Mutex::new(State::default()),
                    idle: Notify::new(),
                    sent: Arc::new(Notify::new()),
                    commit_lock: tokio::sync::Mutex::new(()),
                });
                files.insert(ino, f.clone());
                f
            }
        }
    }

    /// Whether `ino` has data we have not yet handed to the server or that
    /// is still on its way.
    pub fn is_dirty(&self, ino: u64) -> bool {
        self.files.lock().get(&ino).is_some_and(|f| {
            let s = f.state.lock();
            s.gather.is_some() || s.inflight > 0
        })
    }

    /// End of the data written through us, if any is not yet on the server.
    pub fn local_end(&self, ino: u64) -> Option<u64> {
        self.files.lock().get(&ino).map(|f| f.state.lock().end)
    }

    /// Buffers `data` at `offset`; returns once it is accepted (not durable).
    pub async fn write(
        self: &Arc<Self>,
        ino: u64,
        fh: &FileHandle,
        cred: &Credential,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), FsError> {
        let permit = match self
            .budget
            .clone()
            .try_acquire_many_owned(data.len() as u32)
        {
            Ok(p) => p,
            Err(_) => {
                // At the bound: ask the flusher to commit, then wait our turn.
                self.pressure.notify_one();
                self.budget
                    .clone()
                    .acquire_many_owned(data.len() as u32)
                    .await
                    .map_err(|_| FsError::IO)?
            }
        };
        let end = offset + data.len() as u64;
        let mut accepted = Some((data, permit));
        loop {
            let (file, sends, wait) = {
                let mut files = self.files.lock();
                let file = Self::file_in(&mut files, ino, fh);
                let mut s = file.state.lock();
                // `release` needs this state's lock too: it cannot slip in now.
                drop(files);
                s.cred = Some(cred.clone());
                let mut sends = Vec::new();
                if s.gather.as_ref().is_some_and(|g| {
                    g.overlaps(offset, end) && !g.can_take(offset, end, self.wsize)
                }) {
                    sends.extend(s.take_gather());
                }
                let mut wait = None;
                if s.is_sending(offset, end) {
                    wait = Some(file.next_sent());
                } else if let Some((data, permit)) = accepted.take() {
                    sends.extend(s.accept(offset, data, permit, self.wsize));
                }
                drop(s);
                (file, sends, wait)
            };
            for g in sends {
                self.spawn_send(ino, file.clone(), g, StableHow::Unstable);
            }
            match wait {
                Some(sent) => sent.await,
                None => return Ok(()),
            }
        }
    }

    fn spawn_send(self: &Arc<Self>, ino: u64, file: Arc<FileWrites>, g: Gather, how: StableHow) {
        let wb = self.clone();
        tokio::spawn(async move { wb.send_gather(ino, &file, g, how).await });
    }

    /// WRITEs one gathered chunk and files the outcome: uncommitted (to be
    /// COMMITted later), durable, or a sticky error.
    async fn send_gather(&self, ino: u64, file: &FileWrites, g: Gather, how: StableHow) {
        let cred = file.state.lock().cred.clone().unwrap_or(Credential::None);
        let (from, to) = (g.offset, g.end());
        // A short chunk (a small file, a gather that aged out) must not pin
        // a whole wsize allocation until COMMIT: the budget counts bytes.
        let data = if g.buf.len() * 2 < g.buf.capacity() {
            Bytes::copy_from_slice(&g.buf)
        } else {
            g.buf.freeze()
        };
        let result = self
            .send_chunk(ino, &file.fh, &cred, g.offset, &data, how)
            .await;
        let mut s = file.state.lock();
        match result {
            Ok(sent) if sent.how == StableHow::Unstable => {
                s.oldest_uncommitted.get_or_insert_with(Instant::now);
                s.uncommitted.push(Chunk {
                    offset: g.offset,
                    data,
                    verf: sent.verf,
                    resend: sent.mixed,
                    committing: false,
                    _permit: Some(g.permit),
                });
            }
            Ok(_) => {} // already durable; the permit is released here
            Err(e) => {
                warn!(ino, offset = g.offset, error = %e, "write-back failed");
                self.keep_error(&mut s, e);
            }
        }
        s.sent(from, to);
        self.after_send(file, &s);
    }

    /// Wakes whoever waits for a WRITE to leave the wire.
    fn after_send(&self, file: &FileWrites, s: &State) {
        file.sent.notify_waiters();
        if s.inflight == 0 {
            file.idle.notify_waiters();
        }
    }

    /// Keeps a failed write for every descriptor open now to report.
    fn keep_error(&self, s: &mut State, error: FsError) {
        s.error = Some(WriteError {
            stamp: self.error_stamps.fetch_add(1, Ordering::Relaxed) + 1,
            error,
            reported: false,
        });
    }

    /// WRITEs one chunk, continuing after short writes.
    async fn send_chunk(
        &self,
        ino: u64,
        fh: &FileHandle,
        cred: &Credential,
        offset: u64,
        data: &Bytes,
        how: StableHow,
    ) -> Result<Sent, FsError> {
        let mut done = 0usize;
        let mut weakest = StableHow::FileSync;
        let mut verf: Option<WriteVerf> = None;
        let mut mixed = false;
        while done < data.len() {
            let at = offset + done as u64;
            let ok = self
                .nfs
                .write_bytes(cred, fh, at, data.slice(done..), how)
                .await?;
            let count = (ok.count as usize).min(data.len() - done);
            (self.wcc_sink)(ino, &ok.wcc, Some((at, at + count as u64)));
            if count == 0 {
                return Err(FsError::IO);
            }
            done += count;
            if ok.committed == StableHow::Unstable {
                weakest = StableHow::Unstable;
                // Pieces written under different server instances: one
                // COMMIT verifier cannot vouch for all of them.
                mixed |= verf.is_some_and(|v| v != ok.verf);
                verf = Some(ok.verf);
            }
        }
        Ok(Sent {
            verf: verf.unwrap_or_default(),
            how: weakest,
            mixed,
        })
    }

    /// An O_DIRECT write, sent as the kernel client sends one: after
    /// everything buffered before it (so it lands last), FILE_SYNC in wsize
    /// pieces, and answered by its own outcome alone. Other descriptors'
    /// uncommitted data and saved errors stay for their own close.
    pub async fn write_sync(
        self: &Arc<Self>,
        ino: u64,
        fh: &FileHandle,
        cred: &Credential,
        offset: u64,
        data: Bytes,
    ) -> Result<(), FsError> {
        if self.is_dirty(ino) {
            self.drain(ino).await?;
        }
        // Like a buffered write, it replaces what uncommitted chunks hold
        // of its bytes, so no resend puts those back over it.
        let end = offset + data.len() as u64;
        loop {
            let wait = {
                let files = self.files.lock();
                let Some(file) = files.get(&ino).filter(|f| f.fh == *fh) else {
                    break;
                };
                let mut s = file.state.lock();
                if s.is_sending(offset, end) {
                    file.next_sent()
                } else {
                    s.supersede(offset, end);
                    break;
                }
            };
            wait.await;
        }
        let mut at = 0;
        while at < data.len() {
            let n = (data.len() - at).min(self.wsize);
            let piece = data.slice(at..at + n);
            self.send_chunk(
                ino,
                fh,
                cred,
                offset + at as u64,
                &piece,
                StableHow::FileSync,
            )
            .await?;
            at += n;
        }
        Ok(())
    }

    /// Sends gathered data and waits until nothing is in flight.
    pub async fn drain(self: &Arc<Self>, ino: u64) -> Result<(), FsError> {
        self.drain_as(ino, false).await
    }

    /// Whether `ino` has anything not yet durable on the server: gathered,
    /// in flight, or written but not committed.
    pub fn has_pending(&self, ino: u64) -> bool {
        self.files
            .lock()
            .get(&ino)
            .is_some_and(|f| f.state.lock().has_pending())
    }

    /// Before a SETATTR, as the kernel client does: sends and commits
    /// everything, so no WRITE (nor a resend after a verifier change) lands
    /// after it to move a just-set mtime or regrow a truncated file. Unless
    /// `truncating`, a lone gathered chunk goes FILE_SYNC: tar's utimes,
    /// chown and chmod follow the file's last write, so that data may as
    /// well be durable and spare the close a COMMIT. Sticky write errors
    /// stay for the close to report.
    pub async fn settle(self: &Arc<Self>, ino: u64, truncating: bool) -> Result<(), FsError> {
        self.drain_as(ino, !truncating).await?;
        let Some(file) = self.files.lock().get(&ino).cloned() else {
            return Ok(());
        };
        self.commit_file(ino, &file).await
    }

    /// `durable`: the caller wants the data on stable storage next. When the
    /// gathered chunk is all the file has outstanding, it goes FILE_SYNC and
    /// saves the COMMIT round trip (the kernel client's FLUSH_COND_STABLE):
    /// a small file costs one WRITE on close instead of WRITE + COMMIT.
    async fn drain_as(self: &Arc<Self>, ino: u64, durable: bool) -> Result<(), FsError> {
        let Some(file) = self.files.lock().get(&ino).cloned() else {
            return Ok(());
        };
        let (g, how) = {
            let mut s = file.state.lock();
            let alone = s.inflight == 0 && s.uncommitted.is_empty();
            let g = s.take_gather();
            let how = if durable && alone {
                StableHow::FileSync
            } else {
                StableHow::Unstable
            };
            (g, how)
        };
        if let Some(g) = g {
            // Spawned even when waited for below: a dropped flush must not
            // leave `inflight` counted up forever.
            self.spawn_send(ino, file.clone(), g, how);
        }
        loop {
            let idle = file.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if file.state.lock().inflight == 0 {
                break;
            }
            idle.await;
        }
        Ok(())
    }

    /// Makes everything written so far durable (close, fsync): drain, COMMIT,
    /// and resend chunks whose verifier no longer matches. Its own outcome
    /// only: earlier failed writes are for [`Self::take_error`] to report.
    pub async fn flush(self: &Arc<Self>, ino: u64) -> Result<(), FsError> {
        let result = self.settle(ino, false).await;
        if let Some(file) = self.files.lock().get(&ino) {
            let mut s = file.state.lock();
            if s.gather.is_none() && s.inflight == 0 && s.uncommitted.is_empty() {
                s.end = 0;
            }
        }
        result
    }

    /// What a descriptor opened now starts from: past the failures already
    /// reported, short of one nobody has reported yet. State kept under this
    /// fileid for another handle belongs to a removed file whose fileid the
    /// server gave to this one: it is dropped here, so this file's flush,
    /// fsync and close neither wait on it nor report its errors.
    pub fn error_cursor(&self, ino: u64, fh: &FileHandle) -> u64 {
        let mut files = self.files.lock();
        if files.get(&ino).is_some_and(|f| f.fh != *fh) {
            files.remove(&ino);
        }
        let unreported = files.get(&ino).and_then(|f| {
            let s = f.state.lock();
            s.error.filter(|e| !e.reported).map(|e| e.stamp - 1)
        });
        unreported.unwrap_or_else(|| self.error_stamps.load(Ordering::Relaxed))
    }

    /// The failed write a descriptor at `cursor` has not reported yet, if
    /// any; moves the cursor past it. Without a cursor (a descriptor we do
    /// not know), an error nobody has reported. `settled`: the report is a
    /// close's or an fsync's, which the caller surely sees, so the next
    /// opener need not be told (a write's may be dropped by the kernel).
    pub fn take_error(&self, ino: u64, cursor: Option<&mut u64>, settled: bool) -> Option<FsError> {
        let file = self.files.lock().get(&ino).cloned()?;
        let mut s = file.state.lock();
        let e = s.error.as_mut()?;
        match cursor {
            Some(c) if e.stamp > *c => *c = e.stamp,
            None if !e.reported => {}
            _ => return None,
        }
        e.reported |= settled;
        Some(e.error)
    }

    /// COMMITs what was sent, then sends again, FILE_SYNC, every chunk the
    /// server's verifier no longer vouches for. The chunks stay in the file's
    /// state meanwhile (marked `committing`), so a write can still trim
    /// them and `release` sees them pending. Errors that retrying cannot
    /// cure drop the data and are kept for the writers to report; others
    /// keep it for the next flush and are this call's outcome.
    async fn commit_file(
        self: &Arc<Self>,
        ino: u64,
        file: &Arc<FileWrites>,
    ) -> Result<(), FsError> {
        let _serial = file.commit_lock.lock().await;
        let cred = {
            let mut s = file.state.lock();
            if s.uncommitted.is_empty() {
                return Ok(());
            }
            for c in &mut s.uncommitted {
                c.committing = true;
            }
            // Whatever is sent from now on ages from now.
            s.oldest_uncommitted = None;
            s.cred.clone().unwrap_or(Credential::None)
        };
        let commit = match self.nfs.commit(&cred, &file.fh, 0, 0).await {
            Ok(c) => c,
            Err(e) => {
                let e = FsError::from(e);
                let mut s = file.state.lock();
                if is_final(e) {
                    warn!(ino, error = %e, "COMMIT failed; dropping the uncommitted data");
                    s.uncommitted.retain(|c| !c.committing);
                    self.keep_error(&mut s, e);
                    return Ok(());
                }
                for c in &mut s.uncommitted {
                    c.committing = false;
                }
                // Retried when it ages again, not at the flusher's next look.
                s.oldest_uncommitted = Some(Instant::now());
                return Err(e);
            }
        };
        (self.wcc_sink)(ino, &commit.wcc, None);
        let lost: Vec<Chunk> = {
            let mut s = file.state.lock();
            let (batch, rest): (Vec<Chunk>, Vec<Chunk>) = std::mem::take(&mut s.uncommitted)
                .into_iter()
                .partition(|c| c.committing);
            s.uncommitted = rest;
            s.oldest_uncommitted = (!s.uncommitted.is_empty()).then(Instant::now);
            let lost: Vec<Chunk> = batch
                .into_iter()
                .filter(|c| c.resend || c.verf != commit.verf)
                .map(|c| Chunk {
                    committing: false,
                    ..c
                })
                .collect();
            // On the wire until resent: a write of these bytes waits.
            for c in &lost {
                s.inflight += 1;
                s.sending.push((c.offset, c.end()));
            }
            lost
        };
        if lost.is_empty() {
            return Ok(());
        }
        warn!(
            ino,
            chunks = lost.len(),
            "write verifier changed (server restart?): resending uncommitted data"
        );
        self.resent
            .fetch_add(lost.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // In a task of its own: the chunks are out of the file's state
        // until resent, and a caller that gives up (a dropped flush) must not
        // drop them, nor leave their ranges counted on the wire.
        let (wb, file) = (self.clone(), file.clone());
        tokio::spawn(async move { wb.resend(ino, &file, &cred, lost).await })
            .await
            .unwrap_or(Err(FsError::IO))
    }

    /// Sends `lost` chunks again, FILE_SYNC; see [`Self::commit_file`].
    async fn resend(
        &self,
        ino: u64,
        file: &FileWrites,
        cred: &Credential,
        lost: Vec<Chunk>,
    ) -> Result<(), FsError> {
        let mut lost = lost.into_iter();
        while let Some(c) = lost.next() {
            let sent = self
                .send_chunk(ino, &file.fh, cred, c.offset, &c.data, StableHow::FileSync)
                .await;
            let mut s = file.state.lock();
            s.sent(c.offset, c.end());
            let Err(e) = sent else {
                self.after_send(file, &s);
                continue;
            };
            // This chunk and the rest are off the wire, unsent.
            let rest: Vec<Chunk> = std::iter::once(c).chain(lost).collect();
            for c in &rest[1..] {
                s.sent(c.offset, c.end());
            }
            if is_final(e) {
                warn!(ino, error = %e, "resend failed; dropping the uncommitted data");
                self.keep_error(&mut s, e);
            } else {
                // Kept for the next flush to resend: whoever sees this
                // error may not be the writer.
                s.uncommitted
                    .extend(rest.into_iter().map(|c| Chunk { resend: true, ..c }));
                s.oldest_uncommitted.get_or_insert_with(Instant::now);
            }
            self.after_send(file, &s);
            return if is_final(e) { Ok(()) } else { Err(e) };
        }
        Ok(())
    }

    /// Forgets a file's write state once it has nothing pending and no
    /// failed write an open descriptor (`last`: none is left) or the next
    /// opener still has to report.
    pub fn release(&self, ino: u64, last: bool) {
        let mut files = self.files.lock();
        if let Some(f) = files.get(&ino) {
            let s = f.state.lock();
            if !s.has_pending() && s.error.is_none_or(|e| last && e.reported) {
                drop(s);
                files.remove(&ino);
            }
        }
    }

    /// Drops gathered and uncommitted data beyond `size` after a truncate, so
    /// a late resend cannot resurrect it.
    pub fn truncate(&self, ino: u64, size: u64) {
        if let Some(f) = self.files.lock().get(&ino) {
            let mut s = f.state.lock();
            s.uncommitted.retain(|c| c.offset < size);
            for c in s.uncommitted.iter_mut() {
                let keep = (size - c.offset).min(c.data.len() as u64) as usize;
                c.data.truncate(keep);
            }
            s.end = s.end.min(size);
        }
    }

    /// How many chunks were resent after a verifier change, ever.
    pub fn resent_chunks(&self) -> u64 {
        self.resent.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn budget_in_use(&self) -> usize {
        self.budget_bytes - self.budget.available_permits()
    }

    /// How often the flusher looks: as often as gathers age, within reason.
    fn tick(&self) -> Duration {
        self.gather_age.clamp(Duration::from_millis(10), COMMIT_AGE)
    }

    /// Inodes with write state (pending data or an unreported error).
    pub fn inos(&self) -> Vec<u64> {
        self.files.lock().keys().copied().collect()
    }

    /// Background task: sends aged gathers and commits aged or pressing data.
    async fn flusher(wb: std::sync::Weak<Self>) {
        loop {
            let Some(this) = wb.upgrade() else { return };
            let notified = {
                let pressure = this.pressure.notified();
                tokio::pin!(pressure);
                pressure.as_mut().enable();
                tokio::select! {
                    _ = tokio::time::sleep(this.tick()) => false,
                    _ = &mut pressure => true,
                }
            };
            let under_pressure = notified || this.budget_in_use() * 2 > this.budget_bytes;
            let files: Vec<(u64, Arc<FileWrites>)> = this
                .files
                .lock()
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (ino, file) in files {
                let (send, commit) = {
                    let mut s = file.state.lock();
                    let send = match &s.gather {
                        Some(g) if under_pressure || g.since.elapsed() >= this.gather_age => {
                            s.take_gather()
                        }
                        _ => None,
                    };
                    // A commit already running (or queued) covers this file.
                    let commit = !s.uncommitted.is_empty()
                        && file.commit_lock.try_lock().is_ok()
                        && (under_pressure
                            || s.oldest_uncommitted
                                .is_some_and(|t| t.elapsed() >= COMMIT_AGE));
                    (send, commit)
                };
                if let Some(g) = send {
                    this.spawn_send(ino, file.clone(), g, StableHow::Unstable);
                }
                if commit {
                    let this2 = this.clone();
                    tokio::spawn(async move {
                        // The data stays for the next flush to commit, and
                        // that flush reports its own outcome.
                        if let Err(e) = this2.commit_file(ino, &file).await {
                            debug!(ino, error = %e, "background commit failed; will retry");
                        }
                    });
                }
            }
            drop(this);
        }
    }
}
