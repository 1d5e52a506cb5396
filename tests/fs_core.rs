//! The filesystem core driven in-process (no FUSE) against nfs3_server's
//! memfs: lookup cache, page cache bounds, readahead and invalidation; and
//! ganesha where memfs falls short.

mod common;

use std::sync::Arc;

use common::*;
use csi_nfs_fuse::fs::{Caller, FsConfig, FsError, NfsFs, ROOT_INO};
use csi_nfs_fuse::options::MountOptions;
use csi_nfs_fuse::rpc::RpcConfig;
use nfs3_server::memfs::MemFsConfig;

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

async fn fs_with(files: &[(&str, usize)], opts: &str) -> Arc<NfsFs> {
    let mut cfg = MemFsConfig::default();
    for (name, len) in files {
        cfg.add_file(name, content(*len));
    }
    let port = start_memfs(cfg).await;
    let session = mount_memfs(port, RpcConfig::default()).await;
    NfsFs::new(
        session,
        FsConfig::from_options(&MountOptions::parse(opts).unwrap()),
    )
}

fn calls(fs: &NfsFs) -> u64 {
    fs.session().nfs.rpc().stats().calls_sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_cache_hits_until_the_directory_changes() {
    let fs = fs_with(&[("/a", 10)], "").await;
    let who = Caller::root();
    fs.getattr(&who, ROOT_INO).await.unwrap();
    let first = fs.lookup(&who, ROOT_INO, b"a").await.unwrap();
    let before = calls(&fs);
    let again = fs.lookup(&who, ROOT_INO, b"a").await.unwrap();
    assert_eq!(again.ino, first.ino);
    assert_eq!(calls(&fs), before, "a fresh positive entry needs no LOOKUP");
    assert_eq!(
        fs.lookup(&who, ROOT_INO, b"missing").await.unwrap_err(),
        FsError::NOENT
    );
    let before = calls(&fs);
    assert_eq!(
        fs.lookup(&who, ROOT_INO, b"missing").await.unwrap_err(),
        FsError::NOENT
    );
    assert_eq!(calls(&fs), before, "a fresh negative entry needs no LOOKUP");
    // Creating the name changes the directory's mtime: the negative entry dies.
    fs.create(&who, ROOT_INO, b"missing", 0o644, 0)
        .await
        .unwrap();
    assert!(fs.lookup(&who, ROOT_INO, b"missing").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookupcache_none_always_asks_the_server() {
    let fs = fs_with(&[("/a", 10)], "lookupcache=none").await;
    let who = Caller::root();
    fs.lookup(&who, ROOT_INO, b"a").await.unwrap();
    let before = calls(&fs);
    fs.lookup(&who, ROOT_INO, b"a").await.unwrap();
    assert!(calls(&fs) > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fill_a_bounded_cache_and_prefetch_random_reads_do_not() {
    let size = 24 << 20;
    let fs = fs_with(&[("/big", size)], "cache_size=8M").await;
    let who = Caller::root();
    let e = fs.lookup(&who, ROOT_INO, b"big").await.unwrap();
    let h = fs.open(&who, e.ino, libc::O_RDONLY).await.unwrap().fh;
    let want = content(size);
    let mut off = 0usize;
    while off < size {
        let got = fs
            .read(&who, e.ino, h, off as u64, 128 << 10)
            .await
            .unwrap();
        assert_eq!(&got[..], &want[off..off + got.len()], "at {off}");
        off += got.len();
        let st = fs.cache_stats();
        assert!(st.bytes <= 8 << 20, "cache grew to {} bytes", st.bytes);
    }
    let st = fs.cache_stats();
    assert!(st.blocks > 0, "sequential reads went through the cache");

    // Random 4 KiB reads on a fresh handle bypass the cache: no new blocks.
    let h2 = fs.open(&who, e.ino, libc::O_RDONLY).await.unwrap().fh;
    let fs2 = fs_with(&[("/big", size)], "cache_size=8M").await;
    let e2 = fs2.lookup(&who, ROOT_INO, b"big").await.unwrap();
    let h3 = fs2.open(&who, e2.ino, libc::O_RDONLY).await.unwrap().fh;
    let mut x: u64 = 99;
    for _ in 0..200 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let at = ((x >> 33) % (size as u64 - 4096)) & !4095;
        let got = fs2.read(&who, e2.ino, h3, at, 4096).await.unwrap();
        assert_eq!(&got[..], &want[at as usize..at as usize + 4096]);
    }
    assert_eq!(
        fs2.cache_stats().blocks,
        0,
        "random reads must not fill the cache"
    );
    let _ = h2;
}

/// O_DIRECT means what it means on the kernel client: a read goes to the
/// server even when the block is cached, and a write is on the server before
/// it returns. Two clients of one server show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_direct_reads_and_writes_skip_the_cache() {
    let size = 2 << 20;
    let mut cfg = MemFsConfig::default();
    cfg.add_file("/f", content(size));
    let port = start_memfs(cfg).await;
    let client = |opts: &'static str| async move {
        NfsFs::new(
            mount_memfs(port, RpcConfig::default()).await,
            FsConfig::from_options(&MountOptions::parse(opts).unwrap()),
        )
    };
    // Long attribute lifetimes: only O_DIRECT can make the reader see the
    // other client's write in time.
    let (reader, writer) = (client("actimeo=600").await, client("").await);
    let who = Caller::root();
    let r = reader.lookup(&who, ROOT_INO, b"f").await.unwrap();
    let rh = reader.open(&who, r.ino, libc::O_RDONLY).await.unwrap().fh;
    for i in 0..2u64 {
        reader
            .read(&who, r.ino, rh, i << 20, 1 << 20)
            .await
            .unwrap();
    }
    assert!(
        reader.cache_stats().blocks > 0,
        "the reader cached the file"
    );

    let w = writer.lookup(&who, ROOT_INO, b"f").await.unwrap();
    writer.open(&who, w.ino, libc::O_RDWR).await.unwrap();
    let n = writer
        .write_through(&who, w.ino, 100, b"CHANGED".to_vec())
        .await
        .unwrap();
    assert_eq!(n, 7);
    // No flush, fsync or close: the write itself reached the server.
    let before = calls(&reader);
    let got = reader.read_uncached(&who, r.ino, 98, 11).await.unwrap();
    assert_eq!(&got[..2], &content(size)[98..100]);
    assert_eq!(&got[2..9], b"CHANGED");
    assert!(
        calls(&reader) > before,
        "the O_DIRECT read asked the server"
    );
    // The cached path still holds the old bytes: what O_DIRECT went around.
    let cached = reader.read(&who, r.ino, rh, 100, 7).await.unwrap();
    assert_eq!(&cached[..], &content(size)[100..107]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_invalidate_cached_blocks() {
    let fs = fs_with(&[("/f", 3 << 20)], "").await;
    let who = Caller::root();
    let e = fs.lookup(&who, ROOT_INO, b"f").await.unwrap();
    let h = fs.open(&who, e.ino, libc::O_RDWR).await.unwrap().fh;
    for i in 0..3u64 {
        fs.read(&who, e.ino, h, i << 20, 1 << 20).await.unwrap();
    }
    fs.write(&who, e.ino, h, (1 << 20) + 10, b"NEWDATA".to_vec())
        .await
        .unwrap();
    fs.flush(e.ino, h).await.unwrap();
    let got = fs.read(&who, e.ino, h, (1 << 20) + 8, 12).await.unwrap();
    let mut want = content(3 << 20)[(1 << 20) + 8..(1 << 20) + 20].to_vec();
    want[2..9].copy_from_slice(b"NEWDATA");
    assert_eq!(&got[..], &want[..]);
}

/// In a directory we made, every name is known: the kernel's LOOKUP before
/// each create is answered without a call, until a change by someone else
/// shows up in our next change's wcc_data. Against ganesha: memfs leaves a
/// directory's mtime alone when entries are added, so it cannot show this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_in_a_directory_we_made_need_no_lookup() {
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("knowndirs");
    let fs = NfsFs::new(
        g.mount(RpcConfig::default()).await,
        FsConfig::from_options(&MountOptions::default()),
    );
    let who = Caller::root();
    let top = fs.lookup(&who, ROOT_INO, rel.as_bytes()).await.unwrap().ino;
    let d = fs.mkdir(&who, top, b"d", 0o755).await.unwrap().ino;
    let before = calls(&fs);
    for i in 0..50 {
        let name = format!("f{i}");
        assert_eq!(
            fs.lookup(&who, d, name.as_bytes()).await.unwrap_err(),
            FsError::NOENT
        );
        fs.create(&who, d, name.as_bytes(), 0o644, 0).await.unwrap();
    }
    let spent = calls(&fs) - before;
    println!("50 lookups + creates: {spent} calls");
    assert!(
        spent < 60,
        "{spent} calls: the LOOKUPs before creates went out"
    );
    assert!(
        fs.lookup(&who, d, b"f3").await.is_ok(),
        "a created name is found"
    );
    fs.unlink(&who, d, b"f3").await.unwrap();
    assert_eq!(fs.lookup(&who, d, b"f3").await.unwrap_err(), FsError::NOENT);

    // Someone else adds a name: our next create sees a "before" it did not
    // expect, so lookups ask the server again and find the other's file.
    std::fs::write(on_disk.join("d/theirs"), b"x").unwrap();
    fs.create(&who, d, b"mine", 0o644, 0).await.unwrap();
    assert!(fs.lookup(&who, d, b"theirs").await.is_ok());

    // Without a change of ours to expose it, the knowledge lapses once our
    // changes pause for the negative-entry TTL.
    let d2 = fs.mkdir(&who, top, b"d2", 0o755).await.unwrap().ino;
    fs.create(&who, d2, b"mine", 0o644, 0).await.unwrap();
    std::fs::write(on_disk.join("d2/theirs"), b"x").unwrap();
    tokio::time::sleep(fs.negative_ttl() + std::time::Duration::from_millis(100)).await;
    assert!(fs.lookup(&who, d2, b"theirs").await.is_ok());
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// Closing a read-only descriptor neither waits for nor sends another
/// descriptor's buffered data (and so cannot take the write error that
/// descriptor's close is owed); the writer's own close sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_close_leaves_a_writers_data_to_the_writer() {
    let mut files = MemFsConfig::default();
    files.add_file("/f", content(100));
    let port = start_memfs(files).await;
    let mut cfg = FsConfig::from_options(&MountOptions::default());
    // No background send of the gathered data while the test looks.
    cfg.gather_age = std::time::Duration::from_secs(600);
    let fs = NfsFs::new(mount_memfs(port, RpcConfig::default()).await, cfg);
    let who = Caller::root();
    let e = fs.lookup(&who, ROOT_INO, b"f").await.unwrap();
    let w = fs.open(&who, e.ino, libc::O_WRONLY).await.unwrap();
    assert!(!w.read_only);
    fs.write(&who, e.ino, w.fh, 0, b"fresh".to_vec())
        .await
        .unwrap();
    let r = fs.open(&who, e.ino, libc::O_RDONLY).await.unwrap();
    assert!(
        r.read_only,
        "the kernel is told a read-only close needs no FLUSH"
    );
    let before = calls(&fs);
    fs.flush(e.ino, r.fh).await.unwrap();
    fs.release(&who, e.ino, r.fh).await.unwrap();
    assert_eq!(calls(&fs), before, "the read-only close sent nothing");
    assert!(
        fs.writeback().is_dirty(e.ino),
        "the data still waits for its writer"
    );
    fs.flush(e.ino, w.fh).await.unwrap();
    assert!(calls(&fs) > before, "the writer's close sent it");
    assert!(!fs.writeback().is_dirty(e.ino));
}

/// What a [`fault_proxy`] does with one NFS call.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Pass,
    /// The server gets the call; its reply is lost, and the connection is
    /// cut once the server has had time to act, as by a network failure.
    LoseReply,
    /// The server never sees the call; the client gets this NFS status,
    /// with empty wcc_data (the shape of every failure a COMMIT can get).
    Fail(u32),
    /// As `Fail`, answered only after this long (other calls go on).
    FailAfter(std::time::Duration, u32),
    /// The server answers, and this replaces its reply (the whole fragment).
    RewriteReply(fn(Vec<u8>) -> Vec<u8>),
    /// The server answers, and this edits its reply (the whole fragment,
    /// record mark included) on the way back.
    EditReply(fn(&mut [u8])),
}

/// Reads one record fragment (record mark included) from `r`, or `None` at
/// the end of the stream.
async fn read_fragment(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    pending: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if pending.len() >= 4 {
            let mark = u32::from_be_bytes(pending[..4].try_into().unwrap());
            let end = 4 + (mark & 0x7fff_ffff) as usize;
            if pending.len() >= end {
                return Some(pending.drain(..end).collect());
            }
        }
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// A reply to call `xid` with NFS status `status`: accepted, AUTH_NONE
/// verifier, SUCCESS; then the status and wcc_data with no attributes.
fn failure(xid: u32, status: u32) -> Vec<u8> {
    let words = [0x8000_0000 | 36, xid, 1, 0, 0, 0, 0, status, 0, 0];
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// Listens on `to`'s address and forwards TCP to `to`, whole record fragments at a time, and asks `fault`
/// what to do with each NFS call by its procedure number.
async fn fault_proxy(
    to: std::net::SocketAddr,
    fault: impl Fn(u32) -> Fault + Send + Sync + 'static,
) -> u16 {
    use tokio::io::AsyncWriteExt;
    const NFS_PROGRAM: u32 = 100_003;
    let fault = Arc::new(fault);
    // A call's header after the record mark: xid, CALL (0), RPC version 2,
    // program, version, procedure.
    let nfs_call = |fragment: &[u8]| {
        let word = |i: usize| {
            fragment
                .get(4 + 4 * i..8 + 4 * i)
                .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        };
        (word(1) == Some(0) && word(2) == Some(2) && word(3) == Some(NFS_PROGRAM))
            .then(|| (word(0).unwrap(), word(5).unwrap_or(u32::MAX)))
    };
    let listener = tokio::net::TcpListener::bind((to.ip(), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(to).await.unwrap();
            let (mut cr, cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let cw = Arc::new(tokio::sync::Mutex::new(cw));
            let edits: Arc<parking_lot::Mutex<std::collections::HashMap<u32, Fault>>> =
                Arc::new(parking_lot::Mutex::new(std::collections::HashMap::new()));
            let back = {
                let (cw, edits) = (cw.clone(), edits.clone());
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    while let Some(mut f) = read_fragment(&mut sr, &mut pending).await {
                        let xid = f
                            .get(4..8)
                            .map(|w| u32::from_be_bytes(w.try_into().unwrap()));
                        match xid.and_then(|x| edits.lock().remove(&x)) {
                            Some(Fault::EditReply(edit)) => edit(&mut f),
                            Some(Fault::RewriteReply(rewrite)) => f = rewrite(f),
                            _ => {}
                        }
                        if cw.lock().await.write_all(&f).await.is_err() {
                            return;
                        }
                    }
                })
            };
            let fault = fault.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                // Only a record's first fragment starts with a call header.
                let mut record_start = true;
                while let Some(f) = read_fragment(&mut cr, &mut pending).await {
                    let last = f[0] & 0x80 != 0;
                    // Faults apply to calls sent whole in one fragment (all
                    // but large WRITEs); the rest pass.
                    let call = if record_start && last {
                        nfs_call(&f)
                    } else {
                        None
                    };
                    record_start = last;
                    match call.map_or(Fault::Pass, |(_, procedure)| fault(procedure)) {
                        Fault::Pass => {
                            if sw.write_all(&f).await.is_err() {
                                return;
                            }
                        }
                        Fault::LoseReply => {
                            back.abort();
                            let _ = sw.write_all(&f).await;
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            return;
                        }
                        edit @ (Fault::EditReply(_) | Fault::RewriteReply(_)) => {
                            edits.lock().insert(call.unwrap().0, edit);
                            if sw.write_all(&f).await.is_err() {
                                return;
                            }
                        }
                        Fault::Fail(status) => {
                            let reply = failure(call.unwrap().0, status);
                            if cw.lock().await.write_all(&reply).await.is_err() {
                                return;
                            }
                        }
                        Fault::FailAfter(after, status) => {
                            let (reply, cw) = (failure(call.unwrap().0, status), cw.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(after).await;
                                let _ = cw.lock().await.write_all(&reply).await;
                            });
                        }
                    }
                }
            });
        }
    });
    port
}

/// An O_EXCL create is one GUARDED CREATE, not EXCLUSIVE plus a SETATTR.
/// When its reply is lost, the resend finds the file the first copy made
/// and says EEXIST (memfs has no duplicate request cache); the create must
/// still succeed, by the atime marker it set. Someone else's file stays
/// EEXIST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_create_whose_reply_was_lost_still_succeeds() {
    const CREATE: u32 = 8;
    let once = std::sync::atomic::AtomicBool::new(false);
    let lose_first_create = move |procedure| {
        if procedure == CREATE && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Fault::LoseReply
        } else {
            Fault::Pass
        }
    };
    let memfs = ([127, 0, 0, 1], start_memfs(MemFsConfig::default()).await).into();
    let port = fault_proxy(memfs, lose_first_create).await;
    let session = mount_memfs(port, RpcConfig::default()).await;
    let fs = NfsFs::new(
        session,
        FsConfig::from_options(&MountOptions::parse("").unwrap()),
    );
    let who = Caller::root();
    let excl = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    let connects = |fs: &NfsFs| fs.session().nfs.rpc().stats().connects;
    let before = connects(&fs);
    let created = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        fs.create(&who, ROOT_INO, b"lock", 0o640, excl),
    )
    .await
    .expect("the resent CREATE got no answer");
    assert!(
        connects(&fs) > before,
        "the CREATE's reply was not lost: the proxy did not cut the connection"
    );
    let (entry, _) = created.expect("a resent exclusive create of our own file");
    // (memfs ignores a CREATE's mode; mount_ganesha checks it.)
    assert_eq!(entry.attr.size, 0);
    assert_eq!(
        fs.create(&who, ROOT_INO, b"lock", 0o640, excl).await.err(),
        Some(FsError(libc::EEXIST)),
        "a file made by an earlier create is not ours"
    );
}

/// A connection config for the ganesha export with NFS calls through a
/// [`fault_proxy`] and MOUNT straight.
async fn ganesha_through(
    g: &Ganesha,
    fault: impl Fn(u32) -> Fault + Send + Sync + 'static,
) -> csi_nfs_fuse::nfs::ConnectConfig {
    let nfs = format!("{}:{}", g.host, g.nfs_port)
        .parse()
        .expect("the ganesha host is an address");
    csi_nfs_fuse::nfs::ConnectConfig {
        port: Some(fault_proxy(nfs, fault).await),
        mountport: Some(g.mount_port),
        handshake_timeout: std::time::Duration::from_secs(10),
        ..Default::default()
    }
}

/// An [`NfsFs`] on the ganesha export with NFS calls through a
/// [`fault_proxy`], and the inode of the test directory `rel` in it.
async fn ganesha_fs(
    g: &Ganesha,
    rel: &str,
    fault: impl Fn(u32) -> Fault + Send + Sync + 'static,
) -> (Arc<NfsFs>, u64) {
    let cfg = ganesha_through(g, fault).await;
    let session = csi_nfs_fuse::nfs::session::connect(&g.host, &g.export, &cfg, &root_cred())
        .await
        .unwrap();
    let fs = NfsFs::new(session, FsConfig::from_options(&MountOptions::default()));
    let top = fs
        .lookup(&Caller::root(), ROOT_INO, rel.as_bytes())
        .await
        .unwrap()
        .ino;
    (fs, top)
}

/// Closes `fh` (flush, then release), checks that the server's file `f`
/// holds `data`, and removes the test directory.
async fn close_and_check(fs: &NfsFs, ino: u64, fh: u64, on_disk: &std::path::Path, data: &[u8]) {
    fs.flush(ino, fh).await.unwrap();
    fs.release(&Caller::root(), ino, fh).await.unwrap();
    assert_eq!(std::fs::read(on_disk.join("f")).unwrap(), data);
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// Every name in directory `dir`, listed as the kernel lists: from each
/// answer's last offset until one comes back empty.
async fn list_all(fs: &NfsFs, dir: u64, plus: bool) -> Vec<Vec<u8>> {
    let who = Caller::root();
    let h = fs.opendir(dir).unwrap();
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let items = fs.readdir(&who, h, offset, plus).await.unwrap();
        let Some(last) = items.last() else { break };
        offset = last.offset;
        names.extend(items.iter().map(|i| i.name.to_vec()));
    }
    fs.releasedir(h);
    names
}

/// Writes `data` from offset 0 in 128 KiB pieces, as the kernel sends a
/// large write(2), as root.
async fn write_pieces(fs: &NfsFs, ino: u64, fh: u64, data: &[u8]) {
    const PIECE: usize = 128 << 10;
    for (i, piece) in data.chunks(PIECE).enumerate() {
        fs.write(&Caller::root(), ino, fh, (i * PIECE) as u64, piece.to_vec())
            .await
            .unwrap();
    }
}

/// A COMMIT the server fails keeps the data: fsync reports the failure
/// (EIO), and the next fsync commits the same data again instead of
/// treating it as done. Against ganesha through a proxy that fails COMMITs
/// while told to (memfs writes FILE_SYNC, so it is never asked to commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_keeps_the_data_for_the_next_fsync() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const COMMIT: u32 = 21;
    const NFS3ERR_IO: u32 = 5;
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("commitfail");
    let failing = Arc::new(AtomicBool::new(true));
    let commits = Arc::new(AtomicU64::new(0));
    let fault = {
        let (failing, commits) = (failing.clone(), commits.clone());
        move |procedure| {
            if procedure != COMMIT {
                return Fault::Pass;
            }
            commits.fetch_add(1, Ordering::SeqCst);
            if failing.load(Ordering::SeqCst) {
                Fault::Fail(NFS3ERR_IO)
            } else {
                Fault::Pass
            }
        }
    };
    let (fs, top) = ganesha_fs(&g, &rel, fault).await;
    let who = Caller::root();
    let (e, h) = fs
        .create(&who, top, b"f", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let data = content(3 << 20);
    write_pieces(&fs, e.ino, h.fh, &data).await;
    assert_eq!(fs.fsync(e.ino, h.fh).await, Err(FsError::IO));
    assert!(commits.load(Ordering::SeqCst) >= 1);
    assert!(
        fs.writeback().has_pending(e.ino),
        "the data whose COMMIT failed was dropped"
    );

    failing.store(false, Ordering::SeqCst);
    let refused = commits.load(Ordering::SeqCst);
    fs.fsync(e.ino, h.fh).await.unwrap();
    assert!(
        commits.load(Ordering::SeqCst) > refused,
        "the second fsync did not commit again"
    );
    assert!(!fs.writeback().has_pending(e.ino));
    close_and_check(&fs, e.ino, h.fh, &on_disk, &data).await;
}

/// NFS3ERR_JUKEBOX says the server did nothing and is busy with the file
/// (ganesha's FSAL delay, an HSM recall): the client sends the call again
/// after a pause, as the kernel does, instead of failing the write or the
/// fsync with EAGAIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_is_asked_again() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const WRITE: u32 = 7;
    const COMMIT: u32 = 21;
    const NFS3ERR_JUKEBOX: u32 = 10008;
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("jukebox");
    let writes = Arc::new(AtomicU64::new(0));
    let commits = Arc::new(AtomicU64::new(0));
    let fault = {
        let (writes, commits) = (writes.clone(), commits.clone());
        move |procedure| {
            let seen = match procedure {
                WRITE => writes.fetch_add(1, Ordering::SeqCst),
                COMMIT => commits.fetch_add(1, Ordering::SeqCst),
                _ => return Fault::Pass,
            };
            // The first WRITE once, the first COMMIT twice.
            if (procedure == WRITE && seen == 0) || (procedure == COMMIT && seen < 2) {
                Fault::Fail(NFS3ERR_JUKEBOX)
            } else {
                Fault::Pass
            }
        }
    };
    let (fs, top) = ganesha_fs(&g, &rel, fault).await;
    let who = Caller::root();
    let (e, h) = fs
        .create(&who, top, b"f", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let data = content(3 << 20);
    write_pieces(&fs, e.ino, h.fh, &data).await;
    fs.fsync(e.ino, h.fh)
        .await
        .expect("fsync after JUKEBOX replies");
    assert!(commits.load(Ordering::SeqCst) >= 3, "COMMIT not sent again");
    let chunks = (data.len() as u64).div_ceil(fs.session().wsize as u64);
    assert!(
        writes.load(Ordering::SeqCst) > chunks,
        "WRITE not sent again"
    );
    close_and_check(&fs, e.ino, h.fh, &on_disk, &data).await;
}

/// A server that lists names no local file can have ('/' in them here) gets
/// those entries left out; the kernel would fail the whole listing with EIO.
/// Pages made only of such names are skipped, not taken for the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_names_with_a_slash_are_left_out() {
    const READDIR: u32 = 16;
    const READDIRPLUS: u32 = 17;
    fn slash(reply: &mut [u8]) {
        for at in 0..reply.len().saturating_sub(3) {
            if &reply[at..at + 4] == b"bad-" {
                reply[at + 3] = b'/';
            }
        }
    }
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("slashname");
    // Many pages' worth, so that most pages hold bad names only.
    for i in 0..5000 {
        std::fs::write(on_disk.join(format!("bad-{i:04}")), b"").unwrap();
    }
    let good = ["good-a", "good-b", "good-c"];
    for name in good {
        std::fs::write(on_disk.join(name), b"").unwrap();
    }
    let (fs, top) = ganesha_fs(&g, &rel, |procedure| {
        if procedure == READDIR || procedure == READDIRPLUS {
            Fault::EditReply(slash)
        } else {
            Fault::Pass
        }
    })
    .await;
    for plus in [true, false] {
        let names = list_all(&fs, top, plus).await;
        for name in good {
            assert!(
                names.iter().any(|n| n == name.as_bytes()),
                "plus {plus}: {name} missing from {} names",
                names.len()
            );
        }
        assert!(
            !names.iter().any(|n| n.starts_with(b"bad")),
            "plus {plus}: a bad name was listed"
        );
    }
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// Entries a READDIRPLUS reply could not fit go to the kernel in later
/// calls, served from the page we cached, by inode number: they must still
/// be in the inode table then, or the kernel's next GETATTR of one gets
/// ESTALE. Once the directory is closed, the ones the kernel never took
/// are dropped. (They were dropped as soon as they did not fit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_for_the_next_readdirplus_stay_usable() {
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("rdplus");
    for i in 0..300 {
        std::fs::write(on_disk.join(format!("e{i:03}")), b"x").unwrap();
    }
    let (fs, top) = ganesha_fs(&g, &rel, |_| Fault::Pass).await;
    let who = Caller::root();
    let before = fs.inode_count();
    let h = fs.opendir(top).unwrap();
    // As the FUSE adapter does when the kernel's buffer holds 20 entries:
    // each is counted as the kernel's as it goes in.
    let first = fs.readdir(&who, h, 0, true).await.unwrap();
    assert!(first.len() > 60, "one page of {} entries", first.len());
    let taken: Vec<u64> = first[..20]
        .iter()
        .filter_map(|i| i.entry.as_ref().map(|e| e.ino))
        .collect();
    assert!(taken.iter().all(|&ino| fs.claim_listed(ino)));
    let next = fs.readdir(&who, h, first[19].offset, true).await.unwrap();
    assert_eq!(next[0].name, first[20].name);
    let readdirplus_calls = || {
        let counts = fs.session().nfs.call_counts();
        counts
            .iter()
            .find(|(name, _)| *name == "READDIRPLUS")
            .map_or(0, |c| c.1)
    };
    assert_eq!(readdirplus_calls(), 1, "not served from the cached page");
    for item in &next {
        let e = item.entry.as_ref().expect("attributes for every file");
        fs.getattr(&who, e.ino)
            .await
            .unwrap_or_else(|err| panic!("{:?}: {err:?}", item.name));
    }
    let taken_next: Vec<u64> = next[..20]
        .iter()
        .filter_map(|i| i.entry.as_ref().map(|e| e.ino))
        .collect();
    assert!(taken_next.iter().all(|&ino| fs.claim_listed(ino)));
    fs.releasedir(h);
    // What the kernel took stays; the rest of the page does not.
    assert_eq!(fs.inode_count(), before + taken.len() + taken_next.len());
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// A server that no longer knows a listing's cookie (NFS3ERR_BAD_COOKIE:
/// the directory changed, the server restarted) does not fail the listing:
/// it starts again from the top and goes on after the last entry handed
/// out, as the kernel client does, so every name still comes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_cookie_restarts_the_listing_where_it_was() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const READDIRPLUS: u32 = 17;
    const NFS3ERR_BAD_COOKIE: u32 = 10003;
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("badcookie");
    for i in 0..1500 {
        std::fs::write(on_disk.join(format!("n{i:04}")), b"").unwrap();
    }
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    let (fs, top) = ganesha_fs(&g, &rel, move |procedure| {
        // The second page's call: its cookie is not 0.
        if procedure == READDIRPLUS && seen.fetch_add(1, Ordering::SeqCst) == 1 {
            Fault::Fail(NFS3ERR_BAD_COOKIE)
        } else {
            Fault::Pass
        }
    })
    .await;
    let names = list_all(&fs, top, true).await;
    assert!(
        calls.load(Ordering::SeqCst) >= 3,
        "the cookie was never refused"
    );
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a name was listed twice");
    assert_eq!(names.len(), 1502, "1,500 names plus . and ..");
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// Unlinking the names of an open file: a name with another link beside it
/// is simply removed (the file lives on through the other), the last one is
/// renamed to a `.nfs` name until the last close, and that close removes
/// it, so nothing is left behind. (Each name was once renamed, and only the
/// last `.nfs` name was removed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlinking_every_link_of_an_open_file_leaves_nothing_behind() {
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("sillylinks");
    let (fs, top) = ganesha_fs(&g, &rel, |_| Fault::Pass).await;
    let who = Caller::root();
    let (e, h) = fs
        .create(&who, top, b"a", 0o644, libc::O_RDWR)
        .await
        .unwrap();
    fs.write(&who, e.ino, h.fh, 0, b"still here".to_vec())
        .await
        .unwrap();
    fs.flush(e.ino, h.fh).await.unwrap();
    fs.link(&who, e.ino, top, b"b").await.unwrap();
    fs.unlink(&who, top, b"b").await.unwrap();
    fs.unlink(&who, top, b"a").await.unwrap();
    let names = || -> Vec<String> {
        std::fs::read_dir(&on_disk)
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let left = names();
    assert_eq!(left.len(), 1, "one hidden name while open: {left:?}");
    assert!(left[0].starts_with(".nfs"), "{left:?}");
    let got = fs.read(&who, e.ino, h.fh, 0, 64).await.unwrap();
    assert_eq!(&got[..], b"still here");
    fs.release(&who, e.ino, h.fh).await.unwrap();
    assert!(names().is_empty(), "left behind: {:?}", names());
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// A descriptor closed while a COMMIT is on the wire must not take the
/// file's write state with it: when that COMMIT fails, the data is still
/// pending, and the writer's next fsync commits it. (The state was once
/// dropped as idle while the COMMIT held its chunks, and the data with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_outlives_another_descriptors_close() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const COMMIT: u32 = 21;
    const NFS3ERR_IO: u32 = 5;
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("commitclose");
    let commits = Arc::new(AtomicU64::new(0));
    let fault = {
        let commits = commits.clone();
        move |procedure| {
            if procedure != COMMIT {
                return Fault::Pass;
            }
            if commits.fetch_add(1, Ordering::SeqCst) == 0 {
                Fault::FailAfter(std::time::Duration::from_millis(600), NFS3ERR_IO)
            } else {
                Fault::Pass
            }
        }
    };
    let (fs, top) = ganesha_fs(&g, &rel, fault).await;
    let who = Caller::root();
    let (e, writer) = fs
        .create(&who, top, b"f", 0o644, libc::O_RDWR)
        .await
        .unwrap();
    let reader = fs.open(&who, e.ino, libc::O_RDONLY).await.unwrap();
    let data = content(1 << 20);
    fs.write(&who, e.ino, writer.fh, 0, data.clone())
        .await
        .unwrap();
    fs.writeback().drain(e.ino).await.unwrap();
    let fsync = {
        let fs = fs.clone();
        tokio::spawn(async move { fs.fsync(e.ino, writer.fh).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        commits.load(Ordering::SeqCst),
        1,
        "the COMMIT is not on the wire"
    );
    fs.flush(e.ino, reader.fh).await.unwrap();
    fs.release(&who, e.ino, reader.fh).await.unwrap();
    assert_eq!(fsync.await.unwrap(), Err(FsError::IO));
    assert!(
        fs.writeback().has_pending(e.ino),
        "the data whose COMMIT failed went with the other descriptor's close"
    );
    fs.fsync(e.ino, writer.fh).await.unwrap();
    assert_eq!(
        commits.load(Ordering::SeqCst),
        2,
        "the data was not committed again"
    );
    close_and_check(&fs, e.ino, writer.fh, &on_disk, &data).await;
}

/// After the server's write verifier changes (a restart that lost what it
/// had not committed), the chunks written before it are sent again; bytes
/// a later write replaced must not be among them. Against ganesha through
/// a proxy that gives WRITE and COMMIT replies a new verifier from a point
/// on: an 8 KiB write goes out under the old one, a 4 KiB write into its
/// middle under the new one, and fsync must leave the new bytes in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_verifier_change_keeps_newer_data() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const WRITE: u32 = 7;
    const COMMIT: u32 = 21;
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("verfchange");
    let restarted = Arc::new(AtomicBool::new(false));
    // WRITE3resok and COMMIT3resok both end with the verifier.
    fn new_verifier(f: &mut [u8]) {
        let n = f.len();
        f[n - 8..].copy_from_slice(b"restart!");
    }
    let fault = {
        let restarted = restarted.clone();
        move |procedure| {
            if (procedure == WRITE || procedure == COMMIT) && restarted.load(Ordering::SeqCst) {
                Fault::EditReply(new_verifier)
            } else {
                Fault::Pass
            }
        }
    };
    let (fs, top) = ganesha_fs(&g, &rel, fault).await;
    let who = Caller::root();
    let (e, h) = fs
        .create(&who, top, b"f", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(&who, e.ino, h.fh, 0, vec![b'a'; 8192])
        .await
        .unwrap();
    fs.writeback().drain(e.ino).await.unwrap();
    assert!(
        fs.writeback().has_pending(e.ino),
        "the first write is not uncommitted"
    );
    restarted.store(true, Ordering::SeqCst);
    fs.write(&who, e.ino, h.fh, 2048, vec![b'b'; 4096])
        .await
        .unwrap();
    let resent = fs.writeback().resent_chunks();
    fs.fsync(e.ino, h.fh).await.unwrap();
    assert!(
        fs.writeback().resent_chunks() > resent,
        "the verifier change did not make the first write go again"
    );
    fs.flush(e.ino, h.fh).await.unwrap();
    fs.release(&who, e.ino, h.fh).await.unwrap();
    let mut want = vec![b'a'; 8192];
    want[2048..6144].fill(b'b');
    let got = std::fs::read(on_disk.join("f")).unwrap();
    assert!(
        got == want,
        "the resend put old bytes over new ones: {:?}",
        String::from_utf8_lossy(&got[2040..2060])
    );
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// A write past the end of a file makes its cached last block, which is
/// short, stale: served as it is, a read of that block would end where the
/// file used to, and the kernel takes a short read for the end of the file.
/// Ganesha sends WRITE replies without pre-operation attributes, which makes
/// every write look like someone else's and drops the whole file's cache;
/// the proxy adds them (the file's attributes before the write), as knfsd
/// sends them, so the write is recognised as ours and the cache kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_end_drops_the_short_last_block() {
    const WRITE: u32 = 7;
    // size, mtime and ctime (seconds, nanoseconds) before the write.
    static BEFORE: std::sync::Mutex<(u64, [u32; 4])> = std::sync::Mutex::new((0, [0; 4]));
    fn with_pre_op_attrs(mut f: Vec<u8>) -> Vec<u8> {
        let word = |f: &[u8], at: usize| u32::from_be_bytes(f[at..at + 4].try_into().unwrap());
        // Record mark, xid, REPLY, MSG_ACCEPTED, verifier, SUCCESS, then
        // WRITE3res: status, pre_op_attr flag.
        let status = 24 + (word(&f, 20) as usize).div_ceil(4) * 4 + 4;
        if word(&f, status) != 0 || word(&f, status + 4) != 0 {
            return f;
        }
        let (size, times) = *BEFORE.lock().unwrap();
        let mut attr = vec![0, 0, 0, 1];
        attr.extend_from_slice(&size.to_be_bytes());
        times
            .iter()
            .for_each(|t| attr.extend_from_slice(&t.to_be_bytes()));
        f.splice(status + 4..status + 8, attr);
        let mark = 0x8000_0000 | (f.len() as u32 - 4);
        f[..4].copy_from_slice(&mark.to_be_bytes());
        f
    }
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("pastend");
    std::fs::write(on_disk.join("small"), content(100)).unwrap();
    let (fs, top) = ganesha_fs(&g, &rel, |procedure| {
        if procedure == WRITE {
            Fault::RewriteReply(with_pre_op_attrs)
        } else {
            Fault::Pass
        }
    })
    .await;
    let who = Caller::root();
    let ino = fs.lookup(&who, top, b"small").await.unwrap().ino;
    let reader = fs.open(&who, ino, libc::O_RDONLY).await.unwrap();
    let first = fs.read(&who, ino, reader.fh, 0, 4096).await.unwrap();
    assert_eq!(first.len(), 100);
    assert!(
        fs.cache_stats().blocks >= 1,
        "the read did not cache the block"
    );
    let writer = fs.open(&who, ino, libc::O_WRONLY).await.unwrap();
    let (a, _) = fs.getattr(&who, ino).await.unwrap();
    *BEFORE.lock().unwrap() = (
        a.size,
        [
            a.mtime.seconds,
            a.mtime.nseconds,
            a.ctime.seconds,
            a.ctime.nseconds,
        ],
    );
    let past = fs.session().rsize as u64 * 2;
    fs.write(&who, ino, writer.fh, past, b"past the end".to_vec())
        .await
        .unwrap();
    fs.flush(ino, writer.fh).await.unwrap();
    let again = fs.read(&who, ino, reader.fh, 0, 4096).await.unwrap();
    assert_eq!(again.len(), 4096, "a short read inside the file");
    assert_eq!(&again[..100], &content(100)[..]);
    assert!(again[100..].iter().all(|&b| b == 0));
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// Our own write keeps the rest of the file's cache even on a server that
/// sends no pre-operation attributes with WRITE replies (ganesha): the
/// change is taken as ours, as the kernel client takes it, so blocks the
/// write did not touch are still served without a READ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_write_keeps_the_rest_of_the_cache_without_pre_op_attributes() {
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("forcewcc");
    let (fs, top) = ganesha_fs(&g, &rel, |_| Fault::Pass).await;
    let who = Caller::root();
    let bs = fs.session().rsize as usize;
    std::fs::write(on_disk.join("f"), content(3 * bs)).unwrap();
    let ino = fs.lookup(&who, top, b"f").await.unwrap().ino;
    let h = fs.open(&who, ino, libc::O_RDWR).await.unwrap();
    for k in 0..3 {
        let got = fs
            .read(&who, ino, h.fh, (k * bs) as u64, bs as u32)
            .await
            .unwrap();
        assert_eq!(got.len(), bs);
    }
    fs.write(&who, ino, h.fh, bs as u64 + 10, b"ours".to_vec())
        .await
        .unwrap();
    fs.fsync(ino, h.fh).await.unwrap();
    let before = calls(&fs);
    let again = fs.read(&who, ino, h.fh, 0, bs as u32).await.unwrap();
    assert_eq!(&again[..], &content(3 * bs)[..bs]);
    assert_eq!(
        calls(&fs),
        before,
        "our own write dropped the file's other cached blocks"
    );
    let middle = fs
        .read(&who, ino, h.fh, bs as u64, bs as u32)
        .await
        .unwrap();
    assert_eq!(&middle[10..14], b"ours");
    fs.flush(ino, h.fh).await.unwrap();
    fs.release(&who, ino, h.fh).await.unwrap();
    std::fs::remove_dir_all(on_disk).unwrap();
}

/// A server that keeps times only to the second (FSINFO time_delta, here
/// rewritten on the way back from ganesha) cannot show an exclusive
/// create's atime marker, so O_EXCL goes EXCLUSIVE as the kernel sends it,
/// and the SETATTR after it replaces the verifier in atime and mtime with
/// real times and sets the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_create_on_a_coarse_clock_server_sets_mode_and_times() {
    const FSINFO: u32 = 19;
    const SETATTR: u32 = 2;
    let Some(g) = ganesha() else { return };
    let (on_disk, rel) = g.test_dir("coarseclock");
    // After the record mark: xid, REPLY, MSG_ACCEPTED, the verifier
    // (flavor, length, body), SUCCESS; then FSINFO3res: status, post_op_attr
    // (a flag, then 84 bytes of fattr3), seven u32 sizes, maxfilesize,
    // time_delta.
    fn whole_seconds(f: &mut [u8]) {
        let word = |f: &[u8], at: usize| u32::from_be_bytes(f[at..at + 4].try_into().unwrap());
        let verf_len = word(f, 20) as usize;
        let mut at = 24 + verf_len.div_ceil(4) * 4 + 4;
        assert_eq!(word(f, at), 0, "FSINFO failed");
        at += 4;
        if word(f, at) == 1 {
            at += 84;
        }
        at += 4 + 7 * 4 + 8;
        f[at..at + 8].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    }
    let setattrs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fault = {
        let seen = setattrs.clone();
        move |procedure| match procedure {
            FSINFO => Fault::EditReply(whole_seconds),
            SETATTR => {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Fault::Pass
            }
            _ => Fault::Pass,
        }
    };
    let (fs, top) = ganesha_fs(&g, &rel, fault).await;
    assert_eq!(
        fs.session().fsinfo.time_delta.seconds,
        1,
        "the proxy did not edit FSINFO"
    );
    let who = Caller::root();
    let excl = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    let (e, h) = fs.create(&who, top, b"lock", 0o640, excl).await.unwrap();
    fs.release(&who, e.ino, h.fh).await.unwrap();
    // The SETATTR is what an EXCLUSIVE create needs and a GUARDED one not.
    assert_eq!(setattrs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let now = std::time::SystemTime::now();
    let md = std::fs::metadata(on_disk.join("lock")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.mode() & 0o7777, 0o640);
    for (what, t) in [("atime", md.accessed()), ("mtime", md.modified())] {
        let t = t.unwrap();
        let off = now.duration_since(t).unwrap_or_else(|e| e.duration());
        assert!(off.as_secs() < 60, "{what} {t:?} is not about now");
    }
    assert_eq!(
        fs.create(&who, top, b"lock", 0o640, excl).await.err(),
        Some(FsError(libc::EEXIST))
    );
    std::fs::remove_dir_all(on_disk).unwrap();
}
