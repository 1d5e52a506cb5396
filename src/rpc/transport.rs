//! The pipelined RPC transport.
//!
//! Shaped like tokio-postgres' `Client`/`Connection` split: [`RpcClient`] is a
//! cheap cloneable handle; each of its `nconnect` connections is driven by one
//! task that writes calls (and reconnects), plus a reader task that
//! reassembles records and routes replies to callers by XID. A small call
//! is written by its caller instead when the socket is idle
//! (`ConnShared::send_direct`). Calls keep their
//! encoded payload until answered, so after a reconnect every outstanding call
//! is sent again with the same XID and the server's duplicate-request cache
//! can recognise it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use nfs3_types::xdr_codec::Pack;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::record::RecordDecoder;
use super::{Credential, RpcError, XdrReader, parse_reply};

/// Linux caps the retransmit timeout at 600 s; so do we.
const MAX_TIMEO: Duration = Duration::from_secs(600);
/// Reserved ports the kernel client uses by default (sunrpc min/max_resvport).
const RESVPORT_MIN: u16 = 665;
const RESVPORT_MAX: u16 = 1023;

#[derive(Debug, Clone)]
pub struct RpcConfig {
    /// Time to wait for a reply before retransmitting (nfs `timeo`).
    pub timeo: Duration,
    /// Retransmissions before a soft call fails or a hard call reports the
    /// server as not responding and reconnects (nfs `retrans`).
    pub retrans: u32,
    /// Retry forever (`hard`) or fail with a timeout (`soft`).
    pub hard: bool,
    /// Number of TCP connections to spread calls over (nfs `nconnect`).
    pub nconnect: usize,
    /// Bind a source port below 1024 when running as root (nfs `resvport`).
    pub resvport: bool,
    /// Calls in flight per connection before callers wait.
    pub max_in_flight: usize,
    /// Largest reply record accepted; anything longer resets the connection.
    pub max_record: usize,
    /// Largest record fragment we send; bigger calls are split.
    pub max_send_fragment: usize,
    pub connect_timeout: Duration,
    /// Fail outstanding calls at once when a connection attempt fails,
    /// instead of retrying. For one-shot work (the mount handshake, the CSI
    /// controller) where "connection refused" should be reported, not waited out.
    pub fail_fast_connect: bool,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            timeo: Duration::from_secs(60),
            retrans: 2,
            hard: true,
            nconnect: 1,
            resvport: true,
            max_in_flight: 128,
            max_record: (4 << 20) + (64 << 10),
            max_send_fragment: 4 << 20,
            connect_timeout: Duration::from_secs(10),
            fail_fast_connect: false,
        }
    }
}

/// A cloneable handle to a pipelined RPC client for one server address.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    addr: SocketAddr,
    cfg: RpcConfig,
    conns: Vec<Conn>,
    next_conn: AtomicUsize,
    next_xid: AtomicU32,
}

struct Conn {
    shared: Arc<ConnShared>,
    tx: mpsc::UnboundedSender<u32>,
    window: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A call's encoded bytes: header and arguments, then optionally bulk data
/// kept in the caller's own buffer, and its XDR padding. A WRITE's data is
/// thus never copied into the call, nor held twice while the call is out.
#[derive(Clone, Default)]
pub struct CallBody {
    parts: [Bytes; 3],
}

impl CallBody {
    pub fn new(head: Bytes) -> Self {
        Self {
            parts: [head, Bytes::new(), Bytes::new()],
        }
    }

    /// `head` ends with the XDR length of `data`, which follows it as an
    /// opaque; the padding to a multiple of four is added here.
    pub fn with_opaque(head: Bytes, data: Bytes) -> Self {
        static ZEROS: [u8; 3] = [0; 3];
        let pad = (4 - data.len() % 4) % 4;
        Self {
            parts: [head, data, Bytes::from_static(&ZEROS[..pad])],
        }
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slices that hold bytes `range` of the body, in order.
    pub fn slices(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.parts.iter().filter_map(move |p| {
            let (from, to) = (start, start + p.len());
            start = to;
            let (a, b) = (range.start.max(from), range.end.min(to));
            (a < b).then(|| &p[a - from..b - from])
        })
    }
}

/// Where a call's outcome goes: its reply record, or why it has none.
type ReplySender = oneshot::Sender<Result<Bytes, RpcError>>;

struct Pending {
    payload: CallBody,
    reply: Option<ReplySender>,
    /// Connection generation this call was last written on (0: never).
    sent_gen: u64,
    /// Write again even if already written on this generation (a retransmit).
    force: bool,
}

struct ConnShared {
    addr: SocketAddr,
    pending: Mutex<HashMap<u32, Pending>>,
    /// The live connection's write side, shared by the driver task and
    /// callers that write a small call themselves (`ConnShared::send_direct`).
    /// `None` while disconnected.
    writer: tokio::sync::Mutex<Option<WriterSlot>>,
    /// Largest call a caller may write itself: one fragment, small enough to fit
    /// an idle socket's send buffer whole.
    direct_max: usize,
    reconnect: Notify,
    local_addr: Mutex<Option<SocketAddr>>,
    /// The source port of the last connection, for the next one to reuse.
    last_port: Mutex<Option<u16>>,
    stats: ConnStats,
}

struct WriterSlot {
    wr: BufWriter<OwnedWriteHalf>,
    generation: u64,
    /// The unwritten tail of a call that a caller began writing directly;
    /// it must go out before any other byte.
    carry: Option<Bytes>,
    /// The driver is writing calls. Left set if its write was abandoned
    /// half-way (a reconnect request won the race), when the socket may
    /// end inside a record: no caller may write after that.
    busy: bool,
}

/// Calls up to this size may be written by the caller itself: they fit an
/// idle socket's send buffer whole, so a tail is almost never carried.
const DIRECT_MAX: usize = 64 << 10;

/// Counters a test or an operator can read to see what the transport did.
#[derive(Default, Debug)]
pub struct ConnStats {
    pub connects: AtomicU64,
    pub calls_sent: AtomicU64,
    /// Calls written by their caller rather than the driver task.
    pub direct_sends: AtomicU64,
    /// Direct writes the socket took only part of (the driver wrote the rest).
    pub carried_tails: AtomicU64,
    pub retransmits: AtomicU64,
    pub replies: AtomicU64,
    /// Most calls ever outstanding at once on one connection.
    pub max_outstanding: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connects: u64,
    pub calls_sent: u64,
    pub direct_sends: u64,
    pub carried_tails: u64,
    pub retransmits: u64,
    pub replies: u64,
    pub max_outstanding: u64,
}

impl RpcClient {
    /// Creates a client; connections are opened lazily on the first call.
    /// Must be called inside a tokio runtime.
    pub fn new(addr: SocketAddr, cfg: RpcConfig) -> Self {
        let n = cfg.nconnect.clamp(1, 16);
        let conns = (0..n)
            .map(|_| {
                let shared = Arc::new(ConnShared {
                    addr,
                    pending: Mutex::new(HashMap::new()),
                    writer: tokio::sync::Mutex::new(None),
                    direct_max: DIRECT_MAX.min(cfg.max_send_fragment),
                    reconnect: Notify::new(),
                    local_addr: Mutex::new(None),
                    last_port: Mutex::new(None),
                    stats: ConnStats::default(),
                });
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(drive_connection(shared.clone(), rx, cfg.clone()));
                Conn {
                    shared,
                    tx,
                    window: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
                    task,
                }
            })
            .collect();
        Self {
            inner: Arc::new(ClientInner {
                addr,
                cfg,
                conns,
                next_conn: AtomicUsize::new(0),
                next_xid: AtomicU32::new(rand::random()),
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn config(&self) -> &RpcConfig {
        &self.inner.cfg
    }

    /// Local addresses of the currently connected sockets.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner
            .conns
            .iter()
            .filter_map(|c| *c.shared.local_addr.lock())
            .collect()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for c in &self.inner.conns {
            s.connects += c.shared.stats.connects.load(Ordering::Relaxed);
            s.calls_sent += c.shared.stats.calls_sent.load(Ordering::Relaxed);
            s.direct_sends += c.shared.stats.direct_sends.load(Ordering::Relaxed);
            s.carried_tails += c.shared.stats.carried_tails.load(Ordering::Relaxed);
            s.retransmits += c.shared.stats.retransmits.load(Ordering::Relaxed);
            s.replies += c.shared.stats.replies.load(Ordering::Relaxed);
            s.max_outstanding = s
                .max_outstanding
                .max(c.shared.stats.max_outstanding.load(Ordering::Relaxed));
        }
        s
    }

    /// Sends one call and waits for its reply, retransmitting per the config.
    /// Returns a reader positioned at the procedure's results.
    pub async fn call<A: Pack>(
        &self,
        prog: u32,
        vers: u32,
        proc: u32,
        cred: &Credential,
        args: &A,
    ) -> Result<XdrReader, RpcError> {
        let xid = self.inner.next_xid.fetch_add(1, Ordering::Relaxed);
        let head = encode_call(xid, prog, vers, proc, cred, args)?;
        self.call_body(xid, CallBody::new(head), prog, vers, proc)
            .await
    }

    /// Like [`RpcClient::call`], for arguments that end in one opaque: `args`
    /// encode everything before it, including its length, and `data` is
    /// sent from the caller's buffer without a copy.
    pub async fn call_with_opaque<A: Pack>(
        &self,
        (prog, vers, proc): (u32, u32, u32),
        cred: &Credential,
        args: &A,
        data: Bytes,
    ) -> Result<XdrReader, RpcError> {
        let xid = self.inner.next_xid.fetch_add(1, Ordering::Relaxed);
        let head = encode_call(xid, prog, vers, proc, cred, args)?;
        self.call_body(xid, CallBody::with_opaque(head, data), prog, vers, proc)
            .await
    }

    async fn call_body(
        &self,
        xid: u32,
        body: CallBody,
        prog: u32,
        vers: u32,
        proc: u32,
    ) -> Result<XdrReader, RpcError> {
        let record = self
            .call_raw(xid, body, || {
                format!("program {prog} v{vers} procedure {proc}")
            })
            .await?;
        parse_reply(record, prog, vers, proc)
    }

    async fn call_raw(
        &self,
        xid: u32,
        payload: CallBody,
        what: impl Fn() -> String,
    ) -> Result<Bytes, RpcError> {
        let inner = &*self.inner;
        let idx = inner.next_conn.fetch_add(1, Ordering::Relaxed) % inner.conns.len();
        let conn = &inner.conns[idx];
        let _permit = conn
            .window
            .acquire()
            .await
            .map_err(|_| RpcError::Shutdown)?;
        let (tx, mut rx) = oneshot::channel();
        let outstanding = {
            let mut pending = conn.shared.pending.lock();
            pending.insert(
                xid,
                Pending {
                    payload,
                    reply: Some(tx),
                    sent_gen: 0,
                    force: false,
                },
            );
            pending.len() as u64
        };
        conn.shared
            .stats
            .max_outstanding
            .fetch_max(outstanding, Ordering::Relaxed);
        // Forget the call if our caller gives up (timeout, FUSE interrupt).
        let _guard = PendingGuard {
            shared: &conn.shared,
            xid,
        };
        if !conn.shared.send_direct(xid) {
            conn.tx.send(xid).map_err(|_| RpcError::Shutdown)?;
        }

        let cfg = &inner.cfg;
        let start = Instant::now();
        let mut timeo = cfg.timeo;
        let mut timeouts = 0u32;
        let mut reported = false;
        loop {
            match tokio::time::timeout(timeo, &mut rx).await {
                Ok(Ok(result)) => {
                    if reported {
                        info!(server = %inner.addr, "server OK");
                    }
                    return result;
                }
                Ok(Err(_)) => return Err(RpcError::Shutdown),
                Err(_) => {
                    timeouts += 1;
                    let major = timeouts.is_multiple_of(cfg.retrans + 1);
                    if !cfg.hard && timeouts >= cfg.retrans.max(1) {
                        conn.shared.reconnect.notify_one();
                        return Err(RpcError::TimedOut {
                            addr: inner.addr,
                            what: what(),
                            after: start.elapsed(),
                        });
                    }
                    if major {
                        if !reported {
                            warn!(server = %inner.addr, call = %what(), "server not responding, still trying");
                            reported = true;
                        }
                        conn.shared.reconnect.notify_one();
                    } else {
                        if let Some(p) = conn.shared.pending.lock().get_mut(&xid) {
                            p.force = true;
                        }
                        conn.shared
                            .stats
                            .retransmits
                            .fetch_add(1, Ordering::Relaxed);
                        let _ = conn.tx.send(xid);
                    }
                    if cfg.hard {
                        timeo = (timeo + cfg.timeo).min(MAX_TIMEO);
                    }
                }
            }
        }
    }
}

/// The call header, credentials and arguments of one call.
fn encode_call<A: Pack>(
    xid: u32,
    prog: u32,
    vers: u32,
    proc: u32,
    cred: &Credential,
    args: &A,
) -> Result<Bytes, RpcError> {
    let mut payload = Vec::with_capacity(64 + args.packed_size());
    payload.put_u32(xid);
    payload.put_u32(0); // CALL
    payload.put_u32(2); // RPC version
    payload.put_u32(prog);
    payload.put_u32(vers);
    payload.put_u32(proc);
    cred.encode(&mut payload);
    args.pack(&mut payload).map_err(|e| RpcError::GarbageArgs {
        what: format!("program {prog} procedure {proc} (cannot encode: {e})"),
    })?;
    Ok(Bytes::from(payload))
}

struct PendingGuard<'a> {
    shared: &'a ConnShared,
    xid: u32,
}

impl ConnShared {
    /// Writes a small call straight to the socket from the caller's thread
    /// when the connection is up and no one else is writing. This saves
    /// waking the driver task, which on a request from a FUSE thread is a
    /// cross-thread wake-up per call. Returns false when the driver still
    /// has work for this call: nothing was written (it sends the call), or
    /// the socket took only part of it (it writes the tail before any other
    /// byte).
    fn send_direct(&self, xid: u32) -> bool {
        let Ok(mut slot) = self.writer.try_lock() else {
            return false;
        };
        let Some(w) = slot
            .as_mut()
            .filter(|w| !w.busy && w.carry.is_none() && w.wr.buffer().is_empty())
        else {
            return false;
        };
        let (payload, was_sent) = match self.pending.lock().get_mut(&xid) {
            // A reconnect's resend got to it first: already on this connection.
            Some(p) if p.sent_gen == w.generation => return true,
            Some(p) if p.payload.len() <= self.direct_max => (
                p.payload.clone(),
                std::mem::replace(&mut p.sent_gen, w.generation),
            ),
            _ => return false,
        };
        let total_body = payload.len();
        let header = (total_body as u32 | 0x8000_0000).to_be_bytes();
        let mut record = [std::io::IoSlice::new(&[]); 4];
        record[0] = std::io::IoSlice::new(&header);
        for (slot, part) in record[1..].iter_mut().zip(payload.slices(0..total_body)) {
            *slot = std::io::IoSlice::new(part);
        }
        let total = header.len() + total_body;
        match w.wr.get_ref().try_write_vectored(&record) {
            Ok(n) if n > 0 => {
                self.stats.calls_sent.fetch_add(1, Ordering::Relaxed);
                self.stats.direct_sends.fetch_add(1, Ordering::Relaxed);
                if n < total {
                    self.stats.carried_tails.fetch_add(1, Ordering::Relaxed);
                    let mut tail = BytesMut::with_capacity(total - n);
                    tail.extend_from_slice(&header[n.min(4)..]);
                    for part in payload.slices(n.saturating_sub(4)..total_body) {
                        tail.extend_from_slice(part);
                    }
                    w.carry = Some(tail.freeze());
                    return false; // the driver's wake writes the tail
                }
                true
            }
            // Full socket or an error: the driver writes it, and meets the error itself.
            _ => {
                if let Some(p) = self.pending.lock().get_mut(&xid) {
                    p.sent_gen = was_sent;
                }
                false
            }
        }
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.xid);
    }
}

enum ConnEnd {
    Shutdown,
    Failed(String),
}

async fn drive_connection(
    shared: Arc<ConnShared>,
    mut rx: mpsc::UnboundedReceiver<u32>,
    cfg: RpcConfig,
) {
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(50);
    let mut failing_since: Option<Instant> = None;
    loop {
        // Connect lazily: an idle client holds no socket open and a dead
        // server costs nothing until someone calls.
        if shared.pending.lock().is_empty() {
            // The queued XID is covered by the resend of all pending calls below.
            if rx.recv().await.is_none() {
                return;
            }
        }
        let port = *shared.last_port.lock();
        let stream = match connect(shared.addr, &cfg, port).await {
            Ok(s) => s,
            Err(e) if cfg.fail_fast_connect => {
                let waiters: Vec<_> = shared
                    .pending
                    .lock()
                    .drain()
                    .filter_map(|(_, mut p)| p.reply.take())
                    .collect();
                for tx in waiters {
                    let _ = tx.send(Err(RpcError::Connect {
                        addr: shared.addr,
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    }));
                }
                continue;
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() < backoff * 2 {
                    debug!(server = %shared.addr, error = %e, "connect failed");
                } else {
                    warn!(server = %shared.addr, error = %e, "connect failed, retrying");
                }
                match sleep_or_shutdown(&mut rx, backoff).await {
                    Woke::Shutdown => return,
                    Woke::Kicked => backoff = Duration::from_millis(100),
                    Woke::Slept => backoff = (backoff * 2).min(Duration::from_secs(3)),
                }
                continue;
            }
        };
        failing_since = None;
        generation += 1;
        shared.stats.connects.fetch_add(1, Ordering::Relaxed);
        *shared.local_addr.lock() = stream.local_addr().ok();
        *shared.last_port.lock() = stream.local_addr().ok().map(|a| a.port());
        debug!(server = %shared.addr, local = ?stream.local_addr().ok(), generation, "connected");
        let opened = Instant::now();
        // Reconnect requests from calls that timed out on the previous
        // connection are stale now: drop a stored one, or it would tear down
        // this fresh connection at once (and send its calls twice).
        {
            let stale = shared.reconnect.notified();
            tokio::pin!(stale);
            let _ = futures::FutureExt::now_or_never(stale.as_mut());
        }
        let (rd, wr) = stream.into_split();
        // Aborted however this task ends, even when it is aborted itself (the
        // client was dropped): a reader left behind would keep the socket.
        let mut reader = AbortOnDrop(tokio::spawn(read_replies(
            rd,
            shared.clone(),
            cfg.max_record,
        )));
        let end = serve_connection(&shared, &mut rx, wr, &mut reader.0, generation, &cfg).await;
        // Closed before the next connect, which takes over its port. (A
        // finished reader may have been polled to its end already.)
        if !reader.0.is_finished() {
            reader.0.abort();
            let _ = (&mut reader.0).await;
        }
        *shared.local_addr.lock() = None;
        match end {
            ConnEnd::Shutdown => return,
            ConnEnd::Failed(why) => {
                warn!(server = %shared.addr, reason = %why, "connection lost, reconnecting");
                // A server that accepts and then drops us at once must not
                // turn into a busy loop.
                if opened.elapsed() > Duration::from_secs(5) {
                    backoff = Duration::from_millis(50);
                }
                match sleep_or_shutdown(&mut rx, backoff).await {
                    Woke::Shutdown => return,
                    Woke::Kicked => backoff = Duration::from_millis(100),
                    Woke::Slept => backoff = (backoff * 2).min(Duration::from_secs(3)),
                }
            }
        }
    }
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sleeps for `d`, draining queued send requests (they will be covered by the
/// resend after reconnecting). A new request cuts the wait short, so a server
/// that comes back is used at once instead of after the full backoff.
enum Woke {
    Slept,
    Kicked,
    Shutdown,
}

async fn sleep_or_shutdown(rx: &mut mpsc::UnboundedReceiver<u32>, d: Duration) -> Woke {
    let sleep = tokio::time::sleep(d);
    tokio::pin!(sleep);
    let mut kicked = false;
    loop {
        tokio::select! {
            _ = &mut sleep => return if kicked { Woke::Kicked } else { Woke::Slept },
            m = rx.recv() => match m {
                None => return Woke::Shutdown,
                Some(_) if !kicked => {
                    kicked = true;
                    let soon = tokio::time::Instant::now() + Duration::from_millis(100);
                    if soon < sleep.deadline() {
                        sleep.as_mut().reset(soon);
                    }
                }
                Some(_) => {}
            },
        }
    }
}

async fn serve_connection(
    shared: &ConnShared,
    rx: &mut mpsc::UnboundedReceiver<u32>,
    wr: OwnedWriteHalf,
    reader: &mut JoinHandle<String>,
    generation: u64,
    cfg: &RpcConfig,
) -> ConnEnd {
    // Cleared however this ends, even when the driver is aborted: a caller
    // must never write into a connection no task reads or resends for.
    let _clear = ClearWriterSlot(shared);
    let end = async {
        let mut outstanding: Vec<u32> = shared.pending.lock().keys().copied().collect();
        outstanding.sort_unstable();
        let frag = cfg.max_send_fragment;
        let resend = async {
            // The slot is published under the same guard as the resend, so no
            // caller's direct write can start (and leave a tail) in between.
            let mut slot = shared.writer.lock().await;
            let w = slot.insert(WriterSlot {
                wr: BufWriter::with_capacity(64 << 10, wr),
                generation,
                carry: None,
                busy: true,
            });
            for xid in outstanding {
                write_call(&mut w.wr, shared, xid, generation, frag).await?;
            }
            w.wr.flush().await?;
            w.busy = false;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            r = resend => if let Err(e) = r { return ConnEnd::Failed(e.to_string()) },
            r = &mut *reader => return ConnEnd::Failed(reader_end(r)),
        }
        loop {
            tokio::select! {
                biased;
                r = &mut *reader => return ConnEnd::Failed(reader_end(r)),
                _ = shared.reconnect.notified() => return ConnEnd::Failed("server not responding".into()),
                m = rx.recv() => {
                    let Some(xid) = m else { return ConnEnd::Shutdown };
                    let batch = async {
                        let mut slot = shared.writer.lock().await;
                        let w = slot.as_mut().expect("writer slot set for this connection");
                        w.busy = true;
                        // A call a caller began writing must be finished first.
                        if let Some(tail) = w.carry.take() {
                            w.wr.write_all(&tail).await?;
                        }
                        write_call(&mut w.wr, shared, xid, generation, frag).await?;
                        while let Ok(xid) = rx.try_recv() {
                            write_call(&mut w.wr, shared, xid, generation, frag).await?;
                        }
                        w.wr.flush().await?;
                        w.busy = false;
                        Ok::<_, std::io::Error>(())
                    };
                    // A write can block forever on a black-holed peer; a reconnect
                    // request or the reader's death must still get through.
                    tokio::select! {
                        r = batch => if let Err(e) = r { return ConnEnd::Failed(e.to_string()) },
                        r = &mut *reader => return ConnEnd::Failed(reader_end(r)),
                        _ = shared.reconnect.notified() => return ConnEnd::Failed("server not responding".into()),
                    }
                }
            }
        }
    }
    .await;
    discard_writer(&mut *shared.writer.lock().await);
    end
}

/// Drops a connection's write half without the FIN its drop would send
/// (a half-close): the read half's close then resets the connection (zero
/// linger), where a FIN answered by the server's would leave the socket in
/// TIME_WAIT, holding the source port the reconnect wants back.
fn discard_writer(slot: &mut Option<WriterSlot>) {
    if let Some(w) = slot.take() {
        w.wr.into_inner().forget();
    }
}

struct ClearWriterSlot<'a>(&'a ConnShared);

impl Drop for ClearWriterSlot<'_> {
    fn drop(&mut self) {
        // A direct writer holds the lock only for one non-blocking write.
        if let Ok(mut slot) = self.0.writer.try_lock() {
            discard_writer(&mut slot);
        }
    }
}

fn reader_end(r: Result<String, tokio::task::JoinError>) -> String {
    r.unwrap_or_else(|e| format!("reader task ended: {e}"))
}

async fn write_call(
    wr: &mut BufWriter<OwnedWriteHalf>,
    shared: &ConnShared,
    xid: u32,
    generation: u64,
    max_fragment: usize,
) -> std::io::Result<()> {
    let payload = {
        let mut pending = shared.pending.lock();
        let Some(p) = pending.get_mut(&xid) else {
            return Ok(()); // answered or abandoned meanwhile
        };
        if p.sent_gen == generation && !p.force {
            return Ok(());
        }
        p.sent_gen = generation;
        p.force = false;
        p.payload.clone()
    };
    shared.stats.calls_sent.fetch_add(1, Ordering::Relaxed);
    // Record marks are written around slices of the payload, so splitting a
    // large call into fragments costs no copy.
    for (header, range) in super::record::fragment_bounds(payload.len(), max_fragment) {
        wr.write_all(&header).await?;
        for chunk in payload.slices(range) {
            wr.write_all(chunk).await?;
        }
    }
    Ok(())
}

/// Most read from the socket while no record is under way.
const BOUNDARY_READ: u64 = 32 << 10;

/// Reads reply records and hands each to the caller waiting on its XID.
/// Returns why the connection ended; never spins on EOF.
async fn read_replies(mut rd: OwnedReadHalf, shared: Arc<ConnShared>, max_record: usize) -> String {
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut decoder = RecordDecoder::new(max_record);
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(record)) => route_reply(&shared, record),
                Ok(None) => break,
                Err(RpcError::RecordTooLarge { len, max }) => {
                    // The same call would get the same reply after the
                    // reconnect: it fails now, the others are sent again.
                    if let Some(tx) = decoder
                        .record_xid(&buf)
                        .and_then(|x| take_waiter(&shared, x))
                    {
                        let _ = tx.send(Err(RpcError::RecordTooLarge { len, max }));
                    }
                    return RpcError::RecordTooLarge { len, max }.to_string();
                }
                Err(e) => return e.to_string(),
            }
        }
        // Inside a record the decoder has made room for the whole fragment;
        // only between records is there a buffer to provide.
        if buf.len() < 4 && buf.capacity() - buf.len() < BOUNDARY_READ as usize {
            buf.reserve(256 << 10);
        }
        // Between records the next one's size is unknown. Read at most a
        // small reply's worth then: a large READ reply's data goes into the
        // buffer the decoder reserves once its header is in, and what was
        // read before that is all it copies over (up to 256 KiB otherwise,
        // 2% of the daemon's CPU on a cold sequential read). A few small
        // replies still fit one read.
        let read = if buf.len() < 4 {
            (&mut rd).take(BOUNDARY_READ).read_buf(&mut buf).await
        } else {
            rd.read_buf(&mut buf).await
        };
        match read {
            Ok(0) => return "server closed the connection".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// Takes call `xid` off the pending list: whoever waits for its outcome.
fn take_waiter(shared: &ConnShared, xid: u32) -> Option<ReplySender> {
    shared
        .pending
        .lock()
        .remove(&xid)
        .and_then(|mut p| p.reply.take())
}

fn route_reply(shared: &ConnShared, record: Bytes) {
    if record.len() < 4 {
        debug!(server = %shared.addr, "ignoring a reply record shorter than an XID");
        return;
    }
    let xid = u32::from_be_bytes([record[0], record[1], record[2], record[3]]);
    match take_waiter(shared, xid) {
        Some(tx) => {
            shared.stats.replies.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(Ok(record));
        }
        None => debug!(server = %shared.addr, xid, "reply for an unknown or abandoned XID"),
    }
}

/// Connects from `port` when given (the previous connection's), else from
/// a free reserved port (`resvport` as root) or any port. A call resent
/// after a reconnect must come from the same address and port, or the
/// server's duplicate request cache (knfsd's, ganesha's) takes it for a new
/// call and runs a REMOVE or an exclusive CREATE twice; the kernel client
/// reuses its port for the same reason.
async fn connect(
    addr: SocketAddr,
    cfg: &RpcConfig,
    port: Option<u16>,
) -> std::io::Result<TcpStream> {
    let privileged = cfg.resvport && nix::unistd::geteuid().is_root();
    let from = |port: u16| async move {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        let local: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        };
        socket.bind(local)?;
        socket.connect(addr).await
    };
    let taken = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
        )
    };
    let fut = async {
        if let Some(port) = port {
            match from(port).await {
                Ok(s) => return Ok(s),
                Err(e) if taken(&e) => {
                    debug!(server = %addr, port, error = %e, "previous source port not free")
                }
                Err(e) => return Err(e),
            }
        }
        if !privileged {
            // Bound by us, not by connect(), so that it too is SO_REUSEADDR
            // and the reconnect can bind its port again.
            return from(0).await;
        }
        let span = (RESVPORT_MAX - RESVPORT_MIN + 1) as u32;
        let start = rand::random::<u32>() % span;
        let mut last_err = None;
        for i in 0..span {
            match from(RESVPORT_MIN + ((start + i) % span) as u16).await {
                Ok(s) => return Ok(s),
                Err(e) if taken(&e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("no reserved port free")))
    };
    let stream = tokio::time::timeout(cfg.connect_timeout, fut)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", cfg.connect_timeout),
            )
        })??;
    stream.set_nodelay(true)?;
    // Closed with a reset, not a FIN: a connection we drop (to reconnect)
    // must not sit in TIME_WAIT holding the port the next one reuses.
    stream.set_zero_linger()?;
    Ok(stream)
}
