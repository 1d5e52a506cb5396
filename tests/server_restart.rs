//! nfs-ganesha killed with SIGKILL and restarted in the middle of work.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use csi_nfs_fuse::fs::{Caller, FsConfig, NfsFs};
use csi_nfs_fuse::nfs::StableHow;
use csi_nfs_fuse::nfs::client::sattr_none;
use csi_nfs_fuse::options::MountOptions;
use csi_nfs_fuse::rpc::RpcConfig;
use nfs3_types::nfs3::createhow3;

fn chunk(i: u64) -> Vec<u8> {
    (0..(256 << 10))
        .map(|j: u64| ((i * 7 + j) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_calls_complete_after_a_server_restart() {
    let Some(g) = NamedGanesha::start("rpcrestart", &[]) else {
        return;
    };
    let rpc = RpcConfig {
        timeo: Duration::from_millis(500),
        retrans: 2,
        ..Default::default()
    };
    let s = g.mount(rpc).await;
    let c = root_cred();
    let fh = s
        .nfs
        .create(&c, &s.root, b"stream", createhow3::UNCHECKED(sattr_none()))
        .await
        .unwrap()
        .fh
        .unwrap();
    let g = Arc::new(g);
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let (nfs, fh, c) = (s.nfs.clone(), fh.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            nfs.write(&c, &fh, i * (256 << 10), &chunk(i), StableHow::FileSync)
                .await
                .unwrap();
            nfs.getattr(&c, &fh).await.unwrap();
        }));
        if i == 16 {
            g.kill();
            let g2 = g.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                tokio::task::spawn_blocking(move || g2.restart())
                    .await
                    .unwrap();
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("call hung")
            .unwrap();
    }
    let on_disk = std::fs::read(g.export_dir.join("stream")).unwrap();
    for i in 0..48u64 {
        let at = (i * (256 << 10)) as usize;
        assert_eq!(&on_disk[at..at + (256 << 10)], &chunk(i)[..], "chunk {i}");
    }
    assert!(s.nfs.rpc().stats().connects >= 2, "a reconnect happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_calls_fail_within_timeo_times_retrans_while_the_server_is_down() {
    let Some(g) = NamedGanesha::start("softdown", &[]) else {
        return;
    };
    let rpc = RpcConfig {
        timeo: Duration::from_millis(400),
        retrans: 3,
        hard: false,
        ..Default::default()
    };
    let s = g.mount(rpc).await;
    g.kill();
    let start = std::time::Instant::now();
    let err = s.nfs.getattr(&root_cred(), &s.root).await.unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1200 + 500), "{took:?}: {err}");
    g.restart();
    s.nfs
        .getattr(&root_cred(), &s.root)
        .await
        .expect("recovers once the server is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writeback_resends_uncommitted_data_when_the_verifier_changes() {
    let Some(g) = NamedGanesha::start("verf", &[]) else {
        return;
    };
    let rpc = RpcConfig {
        timeo: Duration::from_millis(500),
        ..Default::default()
    };
    let s = g.mount(rpc).await;
    let fs = NfsFs::new(s, FsConfig::from_options(&MountOptions::default()));
    let who = Caller::root();
    let (entry, opened) = fs
        .create(
            &who,
            csi_nfs_fuse::fs::ROOT_INO,
            b"data",
            0o644,
            libc::O_WRONLY,
        )
        .await
        .unwrap();
    let data: Vec<u8> = (0..(8u64 << 20)).map(|i| (i % 253) as u8).collect();
    for (i, part) in data.chunks(1 << 20).enumerate() {
        fs.write(&who, entry.ino, opened.fh, (i << 20) as u64, part.to_vec())
            .await
            .unwrap();
    }
    // Everything is on the server but only UNSTABLE; the restart changes the verifier.
    fs.writeback().drain(entry.ino).await.unwrap();
    g.kill();
    // Ganesha's write verifier is its boot time in seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    g.restart();
    fs.flush(entry.ino, opened.fh)
        .await
        .expect("flush after restart");
    assert!(
        fs.writeback().resent_chunks() > 0,
        "a changed verifier must trigger a resend"
    );
    assert_eq!(std::fs::read(g.export_dir.join("data")).unwrap(), data);
}
