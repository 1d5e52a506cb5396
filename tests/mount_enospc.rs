//! ENOSPC reporting through the mount, in a test binary of its own: an
//! error is reported once per open file description, and a process that
//! another test thread forks inherits our descriptors until it execs, when
//! its close sends a FLUSH that takes the report (the kernel client's
//! errseq_t behaves the same way). Alone here, nothing forks meanwhile.

mod common;

use std::fs;
use std::io::Write;
use std::time::Duration;

use common::*;

/// close(2) with its result: `File`'s drop throws a close error away.
fn close_reporting(f: fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    nix::unistd::close(f.into_raw_fd()).map_err(std::io::Error::from)
}

/// A full server: buffered writes fail in the background, and the error
/// comes back on the next write, on fsync or on close, once per descriptor,
/// by its name (ENOSPC), never swallowed. An O_DIRECT write answers with its
/// own outcome, and another descriptor's close still reports that one's.
#[test]
fn a_full_server_reports_enospc_on_write_fsync_and_close() {
    use std::os::unix::fs::FileExt;
    let Some(g) = NamedGanesha::start("nospc", &["--export-size", "8"]) else {
        return;
    };
    let mut m = FuseMount::start(&g.source(), &g.mount_opts()).unwrap();
    let log = m.capture_stderr();
    let enospc = |r: std::io::Result<()>, what: &str| match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        other => {
            let on_server: Vec<_> = fs::read_dir(&g.export_dir)
                .unwrap()
                .flatten()
                .map(|e| (e.file_name(), e.metadata().map(|m| m.len()).ok()))
                .collect();
            panic!(
                "{what}: {other:?}, expected ENOSPC\non the server: {on_server:?}\nmount log:\n{}",
                log.text()
            )
        }
    };
    let mib = vec![7u8; 1 << 20];

    // A writer streaming past the end of the space sees ENOSPC on a later
    // write or at the latest on fsync.
    let mut f = fs::File::create(m.path("big")).unwrap();
    let by_write = (0..16).map(|_| f.write_all(&mib)).find(Result::is_err);
    let told_by_write = by_write.is_some();
    enospc(
        by_write.unwrap_or_else(|| f.sync_all()),
        "16 MiB into 8 MiB",
    );
    // A write's report does not stand for the close's: FUSE turns an error
    // on a later piece of a large write(2) into a short count.
    let closed = close_reporting(f);
    if told_by_write {
        enospc(closed, "close after a write reported ENOSPC");
    } else {
        closed.expect("fsync reported it already");
    }
    fs::remove_file(m.path("big")).unwrap();
    // The release may come after the unlink (FUSE sends it without waiting),
    // and an unlinked open file is only renamed until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fs::read_dir(&g.export_dir).unwrap().next().is_some() {
        assert!(std::time::Instant::now() < deadline, "big is never removed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Room for less than one chunk: the buffered write succeeds, the close
    // that sends it reports the failure.
    let filler = g.export_dir.join("filler");
    fs::write(&filler, vec![0u8; 7 << 20 | 512 << 10]).unwrap();
    let mut f = fs::File::create(m.path("closed")).unwrap();
    f.write_all(&mib).unwrap();
    enospc(close_reporting(f), "close after a buffered write");

    // fsync reports it once; the next fsync has nothing new to report.
    let mut f = fs::File::create(m.path("synced")).unwrap();
    f.write_all(&mib).unwrap();
    enospc(f.sync_all(), "fsync after a buffered write");
    f.sync_all().expect("the error was reported once already");
    drop(f);

    // A's buffered write fails in the background; B's O_DIRECT write fails
    // on its own, then succeeds once there is room, and A's close still has
    // A's error to report.
    let mut a = fs::File::create(m.path("shared")).unwrap();
    let reader = fs::File::open(m.path("shared")).unwrap();
    a.write_all(&mib).unwrap();
    let b = open_direct_writer(m.path("shared"));
    let block = Block::pattern(3);
    let big = vec![Block([1; 4096]); 256];
    // SAFETY: Block is a plain aligned array; the slice covers exactly the
    // 256 blocks of `big`.
    let big_bytes =
        unsafe { std::slice::from_raw_parts(big.as_ptr().cast::<u8>(), big.len() * 4096) };
    enospc(
        b.write_at(big_bytes, 1 << 20).map(drop),
        "O_DIRECT write into a full server",
    );
    fs::remove_file(&filler).unwrap();
    assert_eq!(b.write_at(&block.0, 0).unwrap(), 4096);
    let mut on_server = vec![0u8; 4096];
    fs::File::open(g.export_dir.join("shared"))
        .unwrap()
        .read_exact_at(&mut on_server, 0)
        .unwrap();
    assert!(
        on_server == pattern(3, 4096),
        "the O_DIRECT write is on the server when write(2) returns"
    );
    // Every writable descriptor open when A's data failed reports it once,
    // B too; one opened after that does not.
    enospc(close_reporting(b), "B's close (open when A's write failed)");
    let c = fs::OpenOptions::new()
        .write(true)
        .open(m.path("shared"))
        .unwrap();
    close_reporting(c).expect("C was opened after the failure");
    enospc(close_reporting(a), "A's close after B's");
    // A reader's fsync is told as the kernel's is; its close is not.
    enospc(
        reader.sync_all(),
        "fsync of a reader open when A's write failed",
    );
    reader.sync_all().expect("told once");
    close_reporting(reader).expect("a read-only close reports nothing");

    // With room again, writing works as before.
    fs::write(m.path("after"), &mib).unwrap();
    assert_eq!(fs::read(g.export_dir.join("after")).unwrap(), mib);
    let log = log.text();
    assert!(
        log.contains("write-back failed"),
        "the mount logs the failed write-back: {log}"
    );
}
