//! The transport against nfs3_server in-process, which answers out of order.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use csi_nfs_fuse::nfs::StableHow;
use csi_nfs_fuse::rpc::RpcConfig;
use nfs3_server::memfs::MemFsConfig;

fn block(i: usize) -> Vec<u8> {
    (0..4096).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_on_one_connection_get_their_own_bytes() {
    let mut cfg = MemFsConfig::default();
    let content: Vec<u8> = (0..256).flat_map(block).collect();
    cfg.add_file("/data.bin", content);
    let port = start_memfs(cfg).await;
    let rpc = RpcConfig {
        nconnect: 1,
        max_in_flight: 256,
        ..Default::default()
    };
    let s = mount_memfs(port, rpc).await;
    let cred = root_cred();
    let fh = s.nfs.lookup(&cred, &s.root, b"data.bin").await.unwrap().fh;

    let mut tasks = Vec::new();
    for i in (0..256).rev() {
        let nfs = s.nfs.clone();
        let fh = fh.clone();
        let cred = cred.clone();
        tasks.push(tokio::spawn(async move {
            let r = nfs.read(&cred, &fh, (i * 4096) as u64, 4096).await.unwrap();
            (i, r.data)
        }));
    }
    for t in tasks {
        let (i, data) = t.await.unwrap();
        assert_eq!(
            &data[..],
            &block(i)[..],
            "block {i} got someone else's bytes"
        );
    }
    let stats = s.nfs.rpc().stats();
    assert_eq!(stats.connects, 1, "all calls on one connection");
    assert!(stats.replies >= 256);
    assert!(
        stats.max_outstanding > 16,
        "calls were not pipelined: at most {} outstanding",
        stats.max_outstanding
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_fragment_calls_and_nconnect_round_trip() {
    let mut cfg = MemFsConfig::default();
    for k in 0..8 {
        cfg.add_file(&format!("/w{k}.bin"), Vec::new());
    }
    let port = start_memfs(cfg).await;
    let rpc = RpcConfig {
        nconnect: 4,
        max_send_fragment: 1000,
        ..Default::default()
    };
    let s = mount_memfs(port, rpc).await;
    let cred = root_cred();
    let mut fhs = Vec::new();
    for k in 0..8 {
        let name = format!("w{k}.bin");
        fhs.push(
            s.nfs
                .lookup(&cred, &s.root, name.as_bytes())
                .await
                .unwrap()
                .fh,
        );
    }
    let payload: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    let mut tasks = Vec::new();
    // memfs refuses writes past EOF, so each task writes its own file.
    for k in 0..8u64 {
        let nfs = s.nfs.clone();
        let fh = fhs[k as usize].clone();
        let cred = cred.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let w = nfs
                .write(&cred, &fh, 0, &payload, StableHow::Unstable)
                .await
                .unwrap();
            assert_eq!(w.count, 65536);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for fh in &fhs {
        s.nfs.commit(&cred, fh, 0, 0).await.unwrap();
        let r = s.nfs.read(&cred, fh, 0, 65536).await.unwrap();
        assert_eq!(&r.data[..], &payload[..]);
    }
    let stats = s.nfs.rpc().stats();
    assert_eq!(stats.connects, 4, "calls spread over all four connections");
    assert_eq!(s.nfs.rpc().local_addrs().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_export_and_closed_port_fail_fast_with_clear_errors() {
    let port = start_memfs(MemFsConfig::default()).await;
    let cfg = memfs_config(port, RpcConfig::default());
    let err =
        csi_nfs_fuse::nfs::session::connect("127.0.0.1", "/no/such/export", &cfg, &root_cred())
            .await
            .err()
            .expect("mount of a missing export must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("/no/such/export") && msg.contains("127.0.0.1"),
        "{msg}"
    );

    // A closed loopback port: connection refused, reported at once.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = memfs_config(closed, RpcConfig::default());
    let start = std::time::Instant::now();
    let err = csi_nfs_fuse::nfs::session::connect("127.0.0.1", "/", &cfg, &root_cred())
        .await
        .err()
        .expect("closed port must fail");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let msg = err.to_string();
    assert!(msg.contains("refused"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_may_be_named_by_hostname() {
    let port = start_memfs(MemFsConfig::default()).await;
    let s = csi_nfs_fuse::nfs::session::connect(
        "localhost",
        "/",
        &memfs_config(port, RpcConfig::default()),
        &root_cred(),
    )
    .await
    .expect("mount by name");
    assert!(s.server.ip().is_loopback());
    // (No unknown-name case: resolving one would query a DNS server off this machine.)
}

/// Forwards TCP to `to`; while `paused` is set it stops reading from the
/// client, so the client's socket buffers fill up.
async fn pausing_proxy(to: u16, paused: Arc<AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", to))
                .await
                .unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
            let paused = paused.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    while paused.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// Small calls are written by their callers straight to the socket. When
/// the socket takes only part of one, the driver must send the rest before
/// any other byte, or every later record on the connection is garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_writing_their_own_calls_into_a_full_socket_lose_nothing() {
    const CHUNK: usize = 60 << 10; // under the direct-write limit
    const CALLS: usize = 256;
    let mut cfg = MemFsConfig::default();
    // memfs refuses writes past the end, and ours arrive in any order.
    cfg.add_file("/w.bin", vec![0; CALLS * CHUNK]);
    let paused = Arc::new(AtomicBool::new(false));
    let port = pausing_proxy(start_memfs(cfg).await, paused.clone()).await;
    let rpc = RpcConfig {
        nconnect: 1,
        max_in_flight: 512,
        ..Default::default()
    };
    let s = mount_memfs(port, rpc).await;
    let cred = root_cred();
    let fh = s.nfs.lookup(&cred, &s.root, b"w.bin").await.unwrap().fh;
    let chunk = |round: usize, i: usize| -> Vec<u8> {
        (0..CHUNK)
            .map(|j| ((round * 7 + i * 13 + j) % 253) as u8)
            .collect()
    };

    // Rounds of writes into a stalled peer until one direct write was cut
    // short (the socket's free space is never a whole number of calls for
    // long, so this takes one round in practice).
    let mut last = 0;
    for round in 0..8 {
        last = round;
        paused.store(true, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for i in 0..CALLS {
            let (nfs, fh, cred) = (s.nfs.clone(), fh.clone(), cred.clone());
            let data = chunk(round, i);
            tasks.push(tokio::spawn(async move {
                let offset = (i * CHUNK) as u64;
                let w = nfs.write(&cred, &fh, offset, &data, StableHow::FileSync);
                w.await.unwrap().count
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        paused.store(false, Ordering::SeqCst);
        for t in tasks {
            // A lost tail leaves the server waiting for bytes that never come.
            let n = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("a write got no reply: the record stream is broken")
                .unwrap();
            assert_eq!(n as usize, CHUNK);
        }
        if s.nfs.rpc().stats().carried_tails > 0 {
            break;
        }
        assert!(
            round < 7,
            "no direct write was ever cut short: {:?}",
            s.nfs.rpc().stats()
        );
    }
    let stats = s.nfs.rpc().stats();
    assert!(stats.direct_sends > 0, "{stats:?}");
    assert_eq!(stats.retransmits, 0, "{stats:?}");
    assert_eq!(
        stats.connects, 1,
        "the stream stayed well-formed: {stats:?}"
    );
    for i in 0..CALLS {
        let r = s
            .nfs
            .read(&cred, &fh, (i * CHUNK) as u64, CHUNK as u32)
            .await
            .unwrap();
        assert!(r.data[..] == chunk(last, i)[..], "chunk {i} differs");
    }
}
