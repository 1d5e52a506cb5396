//! Write-back: gathers writes into wsize chunks, sends them UNSTABLE with many
//! in flight, and keeps each chunk until a COMMIT with a matching verifier
//! proves it durable. A verifier change (the server restarted and lost
//! uncommitted data) makes us send those chunks again, FILE_SYNC.
//!
//! Dirty plus uncommitted memory is bounded by a byte semaphore; a writer that
//! hits the bound waits, and the wait kicks a commit so the bound frees up.

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
    /// A resend after a verifier change failed: send again whatever the
    /// next COMMIT's verifier says.
    resend: bool,
    _permit: OwnedSemaphorePermit,
}

struct Gather {
    offset: u64,
    buf: BytesMut,
    since: Instant,
    permit: OwnedSemaphorePermit,
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
    inflight: usize,
    uncommitted: Vec<Chunk>,
    oldest_uncommitted: Option<Instant>,
    /// The latest write that failed, for every descriptor open at the time
    /// to report (see [`WriteError`]).
    error: Option<WriteError>,
    /// Highest byte offset written through us, for getattr while dirty.
    end: u64,
    cred: Option<Credential>,
}

struct FileWrites {
    fh: FileHandle,
    state: Mutex<State>,
    idle: Notify,
    /// Serialises commits so a flush waits for a background commit's outcome.
    commit_lock: tokio::sync::Mutex<()>,
}

/// Observer of write replies, so the filesystem can track its own changes
/// through wcc_data without invalidating its caches.
pub type WccSink = Arc<dyn Fn(u64, &Wcc) + Send + Sync>;

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
    fn file(&self, ino: u64, fh: &FileHandle) -> Arc<FileWrites> {
        let mut files = self.files.lock();
        match files.get(&ino) {
            Some(f) if f.fh == *fh => f.clone(),
            _ => {
                let f = Arc::new(FileWrites {
                    fh: fh.clone(),
                    state: Mutex::new(State::default()),
                    idle: Notify::new(),
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
        let file = self.file(ino, fh);
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
        let to_send = {
            let mut s = file.state.lock();
            s.cred = Some(cred.clone());
            s.end = s.end.max(offset + data.len() as u64);
            let mut out = None;
            let contiguous = s.gather.as_ref().is_some_and(|g| {
                g.offset + g.buf.len() as u64 == offset && g.buf.len() + data.len() <= self.wsize
            });
            if contiguous {
                let g = s.gather.as_mut().expect("checked above");
                g.buf.extend_from_slice(&data);
                g.permit.merge(permit);
            } else {
                out = s.gather.take();
                // A full-sized write becomes the chunk as it is, without a copy.
                let buf = if data.len() >= self.wsize {
                    BytesMut::from(Bytes::from(data))
                } else {
                    let mut b = BytesMut::with_capacity(self.wsize);
                    b.extend_from_slice(&data);
                    b
                };
                s.gather = Some(Gather {
                    offset,
                    buf,
                    since: Instant::now(),
                    permit,
                });
            }
            let full = s.gather.as_ref().is_some_and(|g| g.buf.len() >= self.wsize);
            let mut sends: Vec<Gather> = out.into_iter().collect();
            if full {
                sends.extend(s.gather.take());
            }
            s.inflight += sends.len();
            sends
        };
        for g in to_send {
            self.spawn_send(ino, file.clone(), g, StableHow::Unstable);
        }
        Ok(())
    }

    fn spawn_send(self: &Arc<Self>, ino: u64, file: Arc<FileWrites>, g: Gather, how: StableHow) {
        let wb = self.clone();
        tokio::spawn(async move { wb.send_gather(ino, &file, g, how).await });
    }

    /// WRITEs one gathered chunk and files the outcome: uncommitted (to be
    /// COMMITted later), durable, or a sticky error.
    async fn send_gather(&self, ino: u64, file: &FileWrites, g: Gather, how: StableHow) {
        let cred = file.state.lock().cred.clone().unwrap_or(Credential::None);
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
            Ok((verf, StableHow::Unstable)) => {
                s.oldest_uncommitted.get_or_insert_with(Instant::now);
                s.uncommitted.push(Chunk {
                    offset: g.offset,
                    data,
                    verf,
                    resend: false,
                    _permit: g.permit,
                });
            }
            Ok(_) => {} // already durable; the permit is released here
            Err(e) => {
                warn!(ino, offset = g.offset, error = %e, "write-back failed");
                s.error = Some(WriteError {
                    stamp: self.error_stamps.fetch_add(1, Ordering::Relaxed) + 1,
                    error: e,
                    reported: false,
                });
            }
        }
        s.inflight -= 1;
        if s.inflight == 0 {
            file.idle.notify_waiters();
        }
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
    ) -> Result<(WriteVerf, StableHow), FsError> {
        let mut done = 0usize;
        let mut weakest = StableHow::FileSync;
        let mut verf = WriteVerf::default();
        while done < data.len() {
            let ok = self
                .nfs
                .write_bytes(cred, fh, offset + done as u64, data.slice(done..), how)
                .await?;
            (self.wcc_sink)(ino, &ok.wcc);
            if ok.count == 0 {
                return Err(FsError::IO);
            }
            done += ok.count as usize;
            if ok.committed == StableHow::Unstable {
                weakest = StableHow::Unstable;
            }
            verf = ok.verf;
        }
        Ok((verf, weakest))
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
        self.files.lock().get(&ino).is_some_and(|f| {
            let s = f.state.lock();
            s.gather.is_some() || s.inflight > 0 || !s.uncommitted.is_empty()
        })
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
            let g = s.gather.take();
            let alone = s.inflight == 0 && s.uncommitted.is_empty();
            if g.is_some() {
                s.inflight += 1;
            }
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
    /// reported, short of one nobody has reported yet.
    pub fn error_cursor(&self, ino: u64, fh: &FileHandle) -> u64 {
        let unreported = self.files.lock().get(&ino).and_then(|f| {
            if f.fh != *fh {
                return None; // another file that had this fileid
            }
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

    async fn commit_file(&self, ino: u64, file: &FileWrites) -> Result<(), FsError> {
        let _serial = file.commit_lock.lock().await;
        let (chunks, cred) = {
            let mut s = file.state.lock();
            s.oldest_uncommitted = None;
            (
                std::mem::take(&mut s.uncommitted),
                s.cred.clone().unwrap_or(Credential::None),
            )
        };
        if chunks.is_empty() {
            return Ok(());
        }
        let commit = match self.nfs.commit(&cred, &file.fh, 0, 0).await {
            Ok(c) => c,
            Err(e) => {
                // Keep the data: a later flush retries the commit.
                let mut s = file.state.lock();
                s.uncommitted.extend(chunks);
                s.oldest_uncommitted.get_or_insert_with(Instant::now);
                return Err(e.into());
            }
        };
        (self.wcc_sink)(ino, &commit.wcc);
        let lost: Vec<Chunk> = chunks
            .into_iter()
            .filter(|c| c.resend || c.verf != commit.verf)
            .collect();
        if !lost.is_empty() {
            warn!(
                ino,
                chunks = lost.len(),
                "write verifier changed (server restart?): resending uncommitted data"
            );
            self.resent
                .fetch_add(lost.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut lost = lost.into_iter();
            while let Some(c) = lost.next() {
                let sent = self
                    .send_chunk(ino, &file.fh, &cred, c.offset, &c.data, StableHow::FileSync)
                    .await;
                if let Err(e) = sent {
                    // Keep this chunk and the rest for the next flush to
                    // resend: whoever sees this error may not be the writer.
                    let mut s = file.state.lock();
                    let keep = std::iter::once(c).chain(lost);
                    s.uncommitted
                        .extend(keep.map(|c| Chunk { resend: true, ..c }));
                    s.oldest_uncommitted.get_or_insert_with(Instant::now);
                    return Err(e);
                }
            }
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
            if s.gather.is_none()
                && s.inflight == 0
                && s.uncommitted.is_empty()
                && s.error.is_none_or(|e| last && e.reported)
            {
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
                            s.inflight += 1;
                            s.gather.take()
                        }
                        _ => None,
                    };
                    let commit = !s.uncommitted.is_empty()
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
