//! Load: 50 volumes published on one node through the CSI plugin (50 mount
//! processes), parallel readers and writers on all of them for a bounded
//! time. No errors, no byte lost, and the descriptors and memory of every
//! mount process stay stable. Prints the per-mount RSS.

mod common;
mod csi_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use csi_common::*;

const VOLUMES: usize = 50;
/// How long readers and writers run.
const LOAD_TIME: Duration = Duration::from_secs(20);
/// Publishes and unpublishes in flight at once.
const PARALLEL_CALLS: usize = 10;
const WRITE_SIZE: usize = 48 << 10;
const READ_FILE_SIZE: usize = 192 << 10;
/// Files in the directory each reader lists.
const LISTED_FILES: usize = 20;
/// Files each writer rotates through (so it also overwrites).
const WRITER_FILES: u64 = 3;
/// Each mount's block cache (default 256M). Blocks of rewritten files
/// stay in the cache until the LRU evicts them, so with the default a
/// mount's RSS grows with the data it reads until 256 MiB; a small cache
/// keeps the bound meaningful within this test.
const CACHE_MIB: u64 = 4;
const MOUNT_OPTIONS: &str = "cache_size=4M";
/// Stability tolerances between the sample after warm-up and the ones
/// halfway and at the end. Descriptors: at most this many more or fewer.
const FD_TOLERANCE: usize = 2;
/// RSS may grow by the cache filling up plus this much: a mount's heap
/// still warms up (allocator arenas of its I/O and FUSE threads) during
/// the few hundred operations each mount gets here. A single mount under
/// the same loop levels off at about 26 MiB after ~3000 operations and
/// then stays within 0.5 MiB over the next 3000.
const RSS_SLACK_KIB: u64 = 8 << 10;
/// And no mount may ever exceed this.
const RSS_CEILING_KIB: u64 = 48 << 10;

struct Sample {
    fds: usize,
    rss_kib: u64,
}

fn sample(pid: i32) -> Sample {
    Sample {
        fds: fd_count(pid),
        rss_kib: rss_kib(pid),
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_volumes_under_parallel_load() {
    let Some(g) = ganesha() else { return };
    let started = Instant::now();
    let p = Plugin::start(&[]).await;
    let base = unique("load");

    // Create and publish 50 volumes.
    let mut vols = Vec::new();
    for i in 0..VOLUMES {
        let sub = format!("{base}/v{i:02}");
        let vol = create(
            &p,
            &format!("{base}-{i}"),
            ganesha_params(&g, &[("subDir", &sub), ("mountOptions", MOUNT_OPTIONS)]),
        )
        .await
        .unwrap();
        vols.push((vol, p.target(&format!("v{i:02}")), g.dir.join(&sub)));
    }
    let created = started.elapsed();
    let t0 = Instant::now();
    for chunk in vols.chunks(PARALLEL_CALLS) {
        let calls = chunk.iter().map(|(vol, t, _)| publish(&p, vol, t, false));
        for r in futures::future::join_all(calls).await {
            r.unwrap();
        }
    }
    let publish_time = t0.elapsed();
    let pids: Vec<i32> = vols.iter().map(|(_, t, _)| one_mount_pid(t)).collect();
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), VOLUMES, "one mount process per volume");

    // Warm-up: the file every reader reads, and one round of the writers'
    // files, so the caches hold the working set before the first sample.
    let targets: Vec<PathBuf> = vols.iter().map(|(_, t, _)| t.clone()).collect();
    let tt = targets.clone();
    within(Duration::from_secs(60), move || {
        for (i, t) in tt.iter().enumerate() {
            std::fs::write(t.join("read.dat"), pattern(i as u64, READ_FILE_SIZE)).unwrap();
            std::fs::create_dir_all(t.join("listed")).unwrap();
            for k in 0..LISTED_FILES {
                std::fs::write(t.join(format!("listed/f{k}")), b"x").unwrap();
            }
            for k in 0..WRITER_FILES {
                std::fs::write(t.join(format!("w{k}")), pattern(1000 + k, WRITE_SIZE)).unwrap();
            }
            assert_eq!(
                std::fs::read(t.join("read.dat")).unwrap().len(),
                READ_FILE_SIZE
            );
        }
    })
    .await;
    let before: Vec<Sample> = pids.iter().map(|&pid| sample(pid)).collect();

    // The load: one writer and one reader thread per volume, all at once,
    // each a bounded loop that stops at the deadline.
    let deadline = Instant::now() + LOAD_TIME;
    let errors = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel::<(usize, Vec<(u64, u64, usize)>)>();
    for (i, t) in targets.iter().enumerate() {
        // Writer: rewrite w0..w2 with fresh content, read each back.
        let (t2, errs, n, tx) = (t.clone(), errors.clone(), writes.clone(), done_tx.clone());
        std::thread::spawn(move || {
            // (file, seed, length) of the last successful write of each file.
            let mut last: Vec<(u64, u64, usize)> = (0..WRITER_FILES)
                .map(|f| (f, 1000 + f, WRITE_SIZE))
                .collect();
            let mut k = 0u64;
            while Instant::now() < deadline && k < 100_000 {
                let file = k % WRITER_FILES;
                let seed = (i as u64) << 32 | k;
                let len = WRITE_SIZE - (k as usize % 4096);
                let data = pattern(seed, len);
                let path = t2.join(format!("w{file}"));
                let problem = match std::fs::write(&path, &data) {
                    Err(e) => Some(format!("write: {e}")),
                    Ok(()) => match std::fs::read(&path) {
                        Err(e) => Some(format!("read back: {e}")),
                        Ok(d) if d != data => Some(format!(
                            "read back {} bytes, wrote {}, first difference at {:?}",
                            d.len(),
                            data.len(),
                            d.iter().zip(&data).position(|(a, b)| a != b)
                        )),
                        Ok(_) => None,
                    },
                };
                match problem {
                    None => {
                        last[file as usize] = (file, seed, len);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(p) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                        eprintln!("writer {i}: {}: {p}", path.display());
                    }
                }
                k += 1;
            }
            let _ = tx.send((i, last));
        });
        // Reader: read.dat must always be the warm-up content; list a
        // directory (READDIRPLUS). Not the writers' directory: listing a
        // file while it has unflushed writes shows a stale size, see
        // `readdir_during_writes_keeps_sizes` below.
        let (t2, errs, n, tx) = (t.clone(), errors.clone(), reads.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let want = pattern(i as u64, READ_FILE_SIZE);
            let mut k = 0u64;
            while Instant::now() < deadline && k < 100_000 {
                let problem = match std::fs::read(t2.join("read.dat")) {
                    Err(e) => Some(format!("read: {e}")),
                    Ok(d) if d != want => Some(format!("read {} bytes that differ", d.len())),
                    Ok(_) => match std::fs::read_dir(t2.join("listed")).map(|d| d.count()) {
                        Err(e) => Some(format!("readdir: {e}")),
                        Ok(n) if n != LISTED_FILES => Some(format!("readdir: {n} entries")),
                        Ok(_) => None,
                    },
                };
                match problem {
                    None => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(p) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                        eprintln!("reader {i}: {p}");
                    }
                }
                k += 1;
            }
            let _ = tx.send((usize::MAX, vec![]));
        });
    }
    drop(done_tx);
    // A sample halfway through: memory must level off under a constant load.
    tokio::time::sleep(LOAD_TIME / 2).await;
    let mid: Vec<Sample> = pids.iter().map(|&pid| sample(pid)).collect();
    let mut last_written: Vec<Vec<(u64, u64, usize)>> = vec![vec![]; VOLUMES];
    for _ in 0..2 * VOLUMES {
        let left = (deadline + Duration::from_secs(30)).saturating_duration_since(Instant::now());
        let (i, last) = done_rx
            .recv_timeout(left)
            .expect("a reader or writer hung for 30 s past the deadline");
        if i != usize::MAX {
            last_written[i] = last;
        }
    }
    let load_time = deadline.elapsed() + LOAD_TIME;
    let after: Vec<Sample> = pids.iter().map(|&pid| sample(pid)).collect();

    // Report.
    eprintln!("mount  pid      fds start/mid/end   RSS KiB start/mid/end");
    for (i, pid) in pids.iter().enumerate() {
        eprintln!(
            "v{i:02}    {pid:<8} {:>3} / {:>3} / {:<3}   {:>6} / {:>6} / {:<6}",
            before[i].fds,
            mid[i].fds,
            after[i].fds,
            before[i].rss_kib,
            mid[i].rss_kib,
            after[i].rss_kib
        );
    }
    let rss_after: Vec<u64> = after.iter().map(|s| s.rss_kib).collect();
    let (reads, writes, errors) = (
        reads.load(Ordering::Relaxed),
        writes.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "{VOLUMES} volumes: create {created:?}, publish {publish_time:?}, load {load_time:?}; \
         {writes} write+verify ops ({} MiB), {reads} read+verify ops ({} MiB), {errors} errors; \
         RSS per mount after the load: min {} KiB, median {} KiB, max {} KiB; \
         plugin RSS {} KiB",
        (writes * WRITE_SIZE as u64) >> 20,
        (reads * READ_FILE_SIZE as u64) >> 20,
        rss_after.iter().min().unwrap(),
        median(rss_after.clone()),
        rss_after.iter().max().unwrap(),
        rss_kib(p.child.as_ref().unwrap().id() as i32),
    );
    assert_eq!(errors, 0, "I/O errors under load");
    assert!(writes > 0 && reads > 0);
    for (i, pid) in pids.iter().enumerate() {
        let (b, a) = (&before[i], &after[i]);
        assert!(
            a.fds.abs_diff(b.fds) <= FD_TOLERANCE,
            "v{i:02} (pid {pid}): descriptors {} -> {}",
            b.fds,
            a.fds
        );
        let limit = b.rss_kib + (CACHE_MIB << 10) + RSS_SLACK_KIB;
        assert!(
            a.rss_kib <= limit,
            "v{i:02} (pid {pid}): RSS {} KiB -> {} KiB (limit {limit} KiB)",
            b.rss_kib,
            a.rss_kib
        );
        assert!(
            mid[i].fds.abs_diff(b.fds) <= FD_TOLERANCE,
            "v{i:02} (pid {pid}): descriptors {} halfway, {} after warm-up",
            mid[i].fds,
            b.fds
        );
        assert!(
            a.rss_kib.max(mid[i].rss_kib) <= RSS_CEILING_KIB,
            "v{i:02} (pid {pid}): RSS {} KiB",
            a.rss_kib
        );
    }
    // Same processes all along: nothing crashed and restarted.
    for (i, (_, t, _)) in vols.iter().enumerate() {
        assert_eq!(one_mount_pid(t), pids[i], "v{i:02} was restarted");
    }

    // Unpublish everything (flush), then check every byte on the server.
    let t0 = Instant::now();
    for chunk in vols.chunks(PARALLEL_CALLS) {
        let calls = chunk
            .iter()
            .map(|(vol, t, _)| unpublish(&p, &vol.volume_id, t));
        for r in futures::future::join_all(calls).await {
            r.unwrap();
        }
    }
    let unpublish_time = t0.elapsed();
    // Warnings explain a slow unpublish (e.g. a mount namespace created
    // elsewhere while the volumes were mounted still holds copies of them).
    let log = p.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("fuser::mnt"))
        .collect();
    for l in warnings.iter().take(3) {
        eprintln!("plugin: {l}");
    }
    if warnings.len() > 3 {
        eprintln!("plugin: ... {} warnings in all", warnings.len());
    }
    let mut lost = 0usize;
    for (i, (_, t, dir)) in vols.iter().enumerate() {
        assert!(!t.exists() && !is_mounted(t), "{}", t.display());
        assert_eq!(last_written[i].len(), WRITER_FILES as usize);
        for &(file, seed, len) in &last_written[i] {
            let want = pattern(seed, len);
            let got = std::fs::read(dir.join(format!("w{file}"))).unwrap();
            if got != want {
                lost += want.len();
                eprintln!("v{i:02}/w{file}: server content differs from the last write");
            }
        }
    }
    assert_eq!(lost, 0, "bytes lost");
    for (vol, _, _) in &vols {
        delete(&p, &vol.volume_id).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(g.dir.join(&base));
    let total = started.elapsed();
    eprintln!("unpublish {unpublish_time:?}; total {total:?}");
    assert!(pids.iter().all(|&pid| {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || proc_status(pid)
                .get("State")
                .is_some_and(|s| s.starts_with('Z'))
    }));
    assert!(total < Duration::from_secs(120), "took {total:?}");
}

/// Regression test for a bug the load test found (in src/fs, not the CSI
/// code): a READDIRPLUS that runs while a file has written-but-unflushed
/// data hands the kernel the server's older attributes (size 0 after the
/// O_TRUNC), so a read right after close(2) returned 0 bytes on this node
/// although the server had all of the data. Fixed in src/fs (entry_for never
/// reports a size below the data written locally but not yet sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_during_writes_keeps_sizes() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let name = unique("rdplus");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("rdplus");
    publish(&p, &vol, &t, false).await.unwrap();
    let stop = Instant::now() + Duration::from_secs(8);
    let dir = t.clone();
    let lister = std::thread::spawn(move || {
        let mut n = 0u64;
        while Instant::now() < stop {
            if let Ok(d) = std::fs::read_dir(&dir) {
                n += d.count() as u64;
            }
        }
        n
    });
    let dir = t.clone();
    let (bad, total) = within(Duration::from_secs(60), move || {
        let (mut bad, mut total) = (0, 0);
        let mut k = 0u64;
        while Instant::now() < stop {
            let data = pattern(k, (256 << 10) + (k as usize % 4096));
            let f = dir.join(format!("f{}", k % 3));
            std::fs::write(&f, &data).unwrap();
            let got = std::fs::read(&f).unwrap();
            if got != data {
                bad += 1;
                eprintln!(
                    "write of {} bytes read back as {} bytes",
                    data.len(),
                    got.len()
                );
            }
            total += 1;
            k += 1;
        }
        (bad, total)
    })
    .await;
    let listed = lister.join().unwrap();
    eprintln!("{bad} of {total} read-backs wrong while {listed} entries were listed");
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    delete(&p, &vol.volume_id).await.unwrap();
    assert_eq!(
        bad, 0,
        "reads after close(2) did not see the data just written"
    );
}
