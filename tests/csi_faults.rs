//! Faults seen from the CSI side, against ganesha and real FUSE mounts:
//! a mount process killed under a container that holds files open, and
//! the plugin stopped (SIGTERM) or killed (SIGKILL) with volumes published.

mod common;
mod csi_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::ChildStdin;
use std::sync::mpsc;

use csi_common::*;

const READER_ENV: &str = "CSI_FAULTS_READER_FILE";

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{:?}", nix::errno::Errno::from_raw(n)),
        None => e.to_string(),
    }
}

fn outcome<T>(r: std::io::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => format!("ok({})", ok(v)),
        Err(e) => format!("err({})", errno_name(&e)),
    }
}

/// The test file: 16-byte records `r000000000042|\n`, 8 MiB in all, so a
/// read at any offset shows which part of the file it got.
const FILE_SIZE: usize = 8 << 20;

fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn record_file() -> Vec<u8> {
    (0..FILE_SIZE / 16)
        .flat_map(|n| format!("r{n:013}|\n").into_bytes())
        .collect()
}

/// Not a test of its own: the "container" of
/// `mount_death_with_an_open_reader`, which runs this test binary again with
/// READER_ENV set. It holds the file open and its working directory inside
/// the volume, and for every `probe OFFSET` line on stdin reports what it
/// can still do: read 15 bytes through the held descriptor at offset 0 (in
/// the page cache since the first probe) and at OFFSET (never read before),
/// fstat it, stat its working directory, and open the file again by
/// relative and by absolute path (reading its first record).
#[test]
fn reader_helper() {
    let Ok(file) = std::env::var(READER_ENV) else {
        return;
    };
    let file = PathBuf::from(file);
    let name = file.file_name().unwrap().to_owned();
    std::env::set_current_dir(file.parent().unwrap()).unwrap();
    let held = std::fs::File::open(&name).unwrap();
    println!("READER ready");
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        let Some(offset) = line.strip_prefix("probe ") else {
            break;
        };
        let offset: u64 = offset.parse().unwrap();
        let read_at = |off: u64| {
            let mut buf = [0u8; 15];
            outcome(held.read_exact_at(&mut buf, off), |()| {
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let first = |path: &Path| {
            std::fs::File::open(path).and_then(|f| {
                let mut buf = [0u8; 15];
                f.read_exact_at(&mut buf, 0)?;
                Ok(String::from_utf8_lossy(&buf).into_owned())
            })
        };
        println!(
            "READER held_read_cached={} held_read_new={} held_fstat={} cwd_stat={} \
             reopen_relative={} reopen_absolute={}",
            read_at(0),
            read_at(offset),
            outcome(held.metadata(), |m| format!("{}B", m.len())),
            outcome(std::fs::metadata("."), |_| String::new()),
            outcome(first(Path::new(&name)), |s| s),
            outcome(first(&file), |s| s),
        );
    }
}

/// The reader process and its report lines.
struct Reader {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Reader {
    fn start(file: &Path) -> Reader {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "reader_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(READER_ENV, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                // libtest's "test reader_helper ... " may precede the first.
                if let Some(i) = l.find("READER ") {
                    let _ = tx.send(l[i + 7..].to_string());
                }
            }
        });
        let mut r = Reader {
            child,
            stdin,
            lines,
        };
        assert_eq!(r.next(), "ready");
        r
    }

    fn next(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the reader did not answer within 20 s (hung on the mount?)")
    }

    /// What the reader sees now, reading new data at `offset`.
    fn probe(&mut self, offset: u64) -> String {
        writeln!(self.stdin, "probe {offset}").unwrap();
        self.next()
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn field<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_death_with_an_open_reader() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let name = unique("death");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("death");
    publish(&p, &vol, &t, false).await.unwrap();
    // Written on the server, so no part of it is in this node's page cache
    // until the reader reads it.
    let file = t.join("data.txt");
    let content = record_file();
    std::fs::write(g.dir.join(&name).join("data.txt"), &content).unwrap();
    let record_at = |off: u64| format!("ok(r{:013}|)", off / 16);
    let whole = record_at(0);

    // And one written through the mount and closed before the kill.
    let closed: Vec<u8> = pattern_bytes(1 << 20);
    let (f, c) = (t.join("closed.bin"), closed.clone());
    within(Duration::from_secs(30), move || {
        std::fs::write(&f, &c).unwrap()
    })
    .await;

    let mut reader = Reader::start(&file);
    let before = reader.probe(0);
    eprintln!("reader before the kill: {before}");
    assert_eq!(field(&before, "held_read_cached"), record_at(0), "{before}");
    assert_eq!(field(&before, "reopen_absolute"), whole, "{before}");
    assert_eq!(field(&before, "reopen_relative"), whole, "{before}");
    assert!(field(&before, "cwd_stat").starts_with("ok"), "{before}");

    // 1. SIGKILL the mount process; the supervisor restores the mount.
    let pid = one_mount_pid(&t);
    let killed = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let restored = eventually(Duration::from_secs(10), || {
        let pids = mount_pids(&t);
        pids.len() == 1 && pids[0] != pid && is_mounted(&t)
    })
    .await;
    assert!(restored, "not restored; log:\n{}", p.log_text());
    let restore_time = killed.elapsed();
    let off1 = 6 << 20;
    let after = reader.probe(off1);
    eprintln!(
        "reader after the supervisor restored the mount ({restore_time:?} after the kill): {after}"
    );
    // The held descriptor and the working directory belong to the dead FUSE
    // connection. What the kernel still has cached may be served; anything
    // that needs the (dead) server fails at once with ENOTCONN rather than
    // hanging. A fresh open by path reaches the new mount and all the data.
    let new_read = field(&after, "held_read_new");
    assert!(
        new_read == "err(ENOTCONN)" || new_read == "err(EIO)",
        "uncached read through the old descriptor: {after}"
    );
    assert!(
        field(&after, "reopen_relative").starts_with("err("),
        "{after}"
    );
    assert_eq!(
        field(&after, "reopen_absolute"),
        whole,
        "new open by path: {after}"
    );
    // The node service reports the mount healthy again, and a repeated
    // NodePublish is OK without another remount.
    stats(&p, &vol.volume_id, t.to_str().unwrap())
        .await
        .unwrap();
    let new_pid = one_mount_pid(&t);
    publish(&p, &vol, &t, false).await.unwrap();
    assert_eq!(one_mount_pid(&t), new_pid);

    // 2. SIGKILL again and NodePublish at once (a CO retry racing the
    // supervisor): the call itself restores the mount.
    kill(Pid::from_raw(new_pid), Signal::SIGKILL).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !mount_pids(&t)
            .contains(&new_pid))
        .await
    );
    let t0 = Instant::now();
    publish(&p, &vol, &t, false).await.unwrap();
    let republish_time = t0.elapsed();
    let f = file.clone();
    let data = within(Duration::from_secs(20), move || std::fs::read(&f).unwrap()).await;
    assert!(data == content, "the file differs after the restarts");
    let f = t.join("closed.bin");
    let data = within(Duration::from_secs(20), move || std::fs::read(&f).unwrap()).await;
    assert!(
        data == closed,
        "data written and closed before the kill was lost"
    );
    assert!(
        std::fs::read(g.dir.join(&name).join("closed.bin")).unwrap() == closed,
        "0 bytes lost on the server"
    );
    let off2 = 7 << 20;
    let again = reader.probe(off2);
    eprintln!("reader after the second kill and NodePublish ({republish_time:?}): {again}");
    assert!(
        field(&again, "held_read_new").starts_with("err("),
        "{again}"
    );
    assert_eq!(field(&again, "reopen_absolute"), whole, "{again}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(mount_pids(&t).len(), 1, "exactly one mount process");

    reader.quit();
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    assert!(!t.exists() && mount_pids(&t).is_empty() && !is_mounted(&t));
    delete(&p, &vol.volume_id).await.unwrap();
    let log = p.log_text();
    assert!(
        log.contains("died unexpectedly") && log.contains("SIGKILL"),
        "{log}"
    );
}

/// Writes `content` to `target/name` and checks it reads back (blocking).
async fn write_read(target: &Path, name: &str, content: &'static [u8]) {
    let f = target.join(name);
    within(Duration::from_secs(20), move || {
        std::fs::write(&f, content).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), content);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_sigterm_then_restart_republish_or_unpublish() {
    let Some(g) = ganesha() else { return };
    let mut p = Plugin::start(&[]).await;
    let name = unique("term-restart");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let (ta, tb) = (p.target("a"), p.target("b"));
    publish(&p, &vol, &ta, false).await.unwrap();
    publish(&p, &vol, &tb, false).await.unwrap();
    write_read(&ta, "a.txt", b"via a").await;
    write_read(&tb, "b.txt", b"via b").await;

    // SIGTERM: the plugin stops its mount processes (they flush and
    // unmount), so nothing is left serving; the data is on the server.
    let st = p.stop();
    assert!(st.success(), "{st:?}");
    for t in [&ta, &tb] {
        assert!(!is_mounted(t), "{} still mounted", t.display());
        assert!(mount_pids(t).is_empty());
        // Swarm re-sends NodePublish only after a dockerd restart: a bare
        // directory left here would be bound into the next task, and its
        // writes would go to this node's disk. Missing, the bind fails.
        assert!(
            !t.exists(),
            "{} left behind as a plain directory",
            t.display()
        );
    }
    assert_eq!(
        std::fs::read(g.dir.join(&name).join("a.txt")).unwrap(),
        b"via a"
    );
    assert_eq!(
        std::fs::read(g.dir.join(&name).join("b.txt")).unwrap(),
        b"via b"
    );

    // A new plugin on the same socket: NodePublish re-establishes one
    // target; NodeUnpublish of the other (never republished) cleans it up.
    let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    let sock = p.sock.clone();
    drop(p);
    let p = Plugin::start_at(dir, sock, &[]).await;
    publish(&p, &vol, &ta, false).await.unwrap();
    let a = ta.clone();
    let data = within(Duration::from_secs(20), move || {
        std::fs::read(a.join("b.txt")).unwrap()
    })
    .await;
    assert_eq!(data, b"via b");
    unpublish(&p, &vol.volume_id, &tb).await.unwrap();
    assert!(!tb.exists(), "target removed by NodeUnpublish");
    unpublish(&p, &vol.volume_id, &ta).await.unwrap();
    assert!(!ta.exists() && !is_mounted(&ta) && mount_pids(&ta).is_empty());
    delete(&p, &vol.volume_id).await.unwrap();
    assert!(!g.dir.join(&name).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_sigkill_then_restart_adopt_or_unpublish() {
    let Some(g) = ganesha() else { return };
    let mut p = Plugin::start(&[]).await;
    let name = unique("kill-restart");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let (ta, tb) = (p.target("a"), p.target("b"));
    publish(&p, &vol, &ta, false).await.unwrap();
    publish(&p, &vol, &tb, false).await.unwrap();
    let (pa, pb) = (one_mount_pid(&ta), one_mount_pid(&tb));

    // SIGKILL: the mount processes live on and keep serving while no
    // plugin runs at all.
    let dir = p.crash();
    let sock = p.sock.clone();
    drop(p);
    write_read(&ta, "while-down.txt", b"no plugin").await;
    write_read(&tb, "while-down-b.txt", b"no plugin either").await;
    assert_eq!((one_mount_pid(&ta), one_mount_pid(&tb)), (pa, pb));

    let p = Plugin::start_at(dir, sock, &[]).await;
    // NodePublish with the same arguments adopts the running process.
    publish(&p, &vol, &ta, false).await.unwrap();
    assert_eq!(one_mount_pid(&ta), pa, "adopted, not remounted");
    stats(&p, &vol.volume_id, ta.to_str().unwrap())
        .await
        .unwrap();
    // NodeUnpublish of a target the new plugin never saw stops the old
    // process (which flushes), detaches and removes the target.
    unpublish(&p, &vol.volume_id, &tb).await.unwrap();
    assert!(!tb.exists() && !is_mounted(&tb));
    assert!(
        eventually(Duration::from_secs(5), || mount_pids(&tb).is_empty()).await,
        "orphaned mount process {pb} still running"
    );
    assert_eq!(
        std::fs::read(g.dir.join(&name).join("while-down-b.txt")).unwrap(),
        b"no plugin either"
    );
    // The adopted one is now managed like any other: unpublish stops it.
    unpublish(&p, &vol.volume_id, &ta).await.unwrap();
    assert!(!ta.exists() && !is_mounted(&ta));
    assert!(eventually(Duration::from_secs(5), || mount_pids(&ta).is_empty()).await);
    assert_eq!(
        std::fs::read(g.dir.join(&name).join("while-down.txt")).unwrap(),
        b"no plugin"
    );
    delete(&p, &vol.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_can_keep_mounts_serving() {
    let Some(g) = ganesha() else { return };
    let keep = [("CSI_NFS_FUSE_KEEP_MOUNTS", "1")];
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run").join("csi.sock");
    let mut p = Plugin::start_with(dir, sock, &[], &keep).await;
    let name = unique("keep");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("keep");
    publish(&p, &vol, &t, false).await.unwrap();
    write_read(&t, "before.txt", b"before the restart").await;
    let pid = one_mount_pid(&t);

    // SIGTERM with CSI_NFS_FUSE_KEEP_MOUNTS: a clean exit that leaves the
    // mount serving, with no plugin running at all.
    let st = p.stop();
    assert!(st.success(), "{st:?}");
    assert!(p.log_text().contains("leaving the mount process running"));
    assert!(is_mounted(&t));
    assert_eq!(one_mount_pid(&t), pid);
    write_read(&t, "between.txt", b"no plugin running").await;

    // The next plugin (say, an upgraded binary) adopts it on NodePublish.
    let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    let sock = p.sock.clone();
    drop(p);
    let p = Plugin::start_with(dir, sock, &[], &keep).await;
    publish(&p, &vol, &t, false).await.unwrap();
    assert_eq!(one_mount_pid(&t), pid, "adopted, not remounted");
    write_read(&t, "after.txt", b"after the restart").await;
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    assert!(!t.exists() && !is_mounted(&t));
    assert!(eventually(Duration::from_secs(5), || mount_pids(&t).is_empty()).await);
    for (f, want) in [
        ("before.txt", &b"before the restart"[..]),
        ("between.txt", b"no plugin running"),
        ("after.txt", b"after the restart"),
    ] {
        assert_eq!(std::fs::read(g.dir.join(&name).join(f)).unwrap(), want);
    }
    delete(&p, &vol.volume_id).await.unwrap();
}

/// A mount process that dies while its server is down: the supervisor
/// leaves the dead mount in place (every access fails with ENOTCONN)
/// instead of detaching it and leaving a bare directory that a new task
/// would bind and write to on the node's own disk; once the server is back
/// it restores the mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_that_dies_during_an_outage_is_not_replaced_by_a_bare_directory() {
    let Some(g) = NamedGanesha::start("csioutage", &[]) else {
        return;
    };
    let p = Plugin::start(&[]).await;
    let vol = create(&p, "outage", soft_named_params(&g)).await.unwrap();
    let t = p.target("outage");
    publish(&p, &vol, &t, false).await.unwrap();
    write_read(&t, "before", b"before the outage").await;

    g.kill();
    let pid = one_mount_pid(&t);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    // Several restart attempts' worth (200 ms, then doubling).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        is_mounted(&t),
        "the dead mount was detached; log:\n{}",
        p.log_text()
    );
    let target = t.clone();
    let written = within(Duration::from_secs(20), move || {
        std::fs::write(target.join("during"), b"lost?")
    })
    .await;
    assert!(
        written.is_err(),
        "a write during the outage succeeded on the node's disk"
    );
    // A CO's NodePublish retry meanwhile is told the server is unavailable
    // and leaves the dead mount in place too.
    assert_code(
        publish(&p, &vol, &t, false).await,
        tonic::Code::Unavailable,
        "",
    );
    assert!(is_mounted(&t), "NodePublish detached the dead mount");

    g.restart();
    let restored = eventually(Duration::from_secs(60), || {
        let pids = mount_pids(&t);
        pids.len() == 1 && pids[0] != pid && is_mounted(&t)
    })
    .await;
    assert!(restored, "not restored; log:\n{}", p.log_text());
    write_read(&t, "after", b"after the outage").await;
    assert_eq!(
        std::fs::read(g.export_dir.join("vol/before")).unwrap(),
        b"before the outage"
    );
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    delete(&p, &vol.volume_id).await.unwrap();
    assert!(
        p.log_text().contains("dead mount stays"),
        "{}",
        p.log_text()
    );
}
