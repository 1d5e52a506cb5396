//! Client-only sequential READ and WRITE throughput (1 MiB calls, many in
//! flight), and the one-call-at-a-time round trip of the metadata calls a
//! shell loop makes (CREATE, REMOVE, GETATTR): no FUSE. The latter is the
//! server's floor under the mount's create/rm rows, which wait for one
//! reply per file. Targets an in-process nfs3_server (memfs) by default, or
//! a real server when CSI_NFS_FUSE_BENCH_SOURCE names one, e.g.
//!   CSI_NFS_FUSE_BENCH_SOURCE=nfs://127.0.0.1/tmp/csi-nfs-fuse-ganesha/default/export \
//!   CSI_NFS_FUSE_BENCH_OPTS=nconnect=2 cargo criterion --bench rpc_throughput

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use csi_nfs_fuse::nfs::client::sattr_none;
use csi_nfs_fuse::nfs::{FileHandle, NfsSession, StableHow};
use csi_nfs_fuse::options::{MountOptions, NfsSource};
use csi_nfs_fuse::rpc::{AuthSys, Credential};
use futures::stream::{FuturesUnordered, StreamExt};
use nfs3_server::memfs::{MemFs, MemFsConfig};
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};
use nfs3_types::nfs3::createhow3;

const FILE: u64 = 64 << 20;
const CALL: u64 = 1 << 20;
const IN_FLIGHT: usize = 16;

fn cred() -> Credential {
    Credential::Sys(AuthSys::new(0, 0, vec![], "bench".into()))
}

async fn session() -> (NfsSession, String) {
    let mut opts = MountOptions::default();
    if let Ok(o) = std::env::var("CSI_NFS_FUSE_BENCH_OPTS") {
        opts.apply(&o).expect("CSI_NFS_FUSE_BENCH_OPTS");
    }
    match std::env::var("CSI_NFS_FUSE_BENCH_SOURCE") {
        Ok(src) => {
            let src = NfsSource::parse(&src).expect("CSI_NFS_FUSE_BENCH_SOURCE");
            let s = csi_nfs_fuse::nfs::session::connect(
                &src.host,
                &src.path,
                &opts.connect_config(),
                &cred(),
            )
            .await
            .expect("mount");
            (s, format!("server {}", src.host))
        }
        Err(_) => {
            let mut cfg = MemFsConfig::default();
            cfg.add_file("/bench.bin", vec![7u8; FILE as usize]);
            let listener = NFSTcpListener::bind("127.0.0.1:0", MemFs::new(cfg).unwrap())
                .await
                .unwrap();
            let port = listener.get_listen_port();
            tokio::spawn(async move { listener.handle_forever().await });
            opts.port = Some(port);
            opts.mountport = Some(port);
            let s = csi_nfs_fuse::nfs::session::connect(
                "127.0.0.1",
                "/",
                &opts.connect_config(),
                &cred(),
            )
            .await
            .expect("mount memfs");
            (s, "in-process memfs".into())
        }
    }
}

async fn file(s: &NfsSession) -> FileHandle {
    let c = cred();
    if let Ok(l) = s.nfs.lookup(&c, &s.root, b"bench.bin").await {
        return l.fh;
    }
    let fh = s
        .nfs
        .create(
            &c,
            &s.root,
            b"bench.bin",
            createhow3::UNCHECKED(sattr_none()),
        )
        .await
        .unwrap()
        .fh
        .unwrap();
    write_all(s, &fh, &vec![7u8; CALL as usize]).await;
    fh
}

async fn write_all(s: &NfsSession, fh: &FileHandle, buf: &[u8]) {
    let c = cred();
    let mut calls = FuturesUnordered::new();
    let mut off = 0;
    while off < FILE || !calls.is_empty() {
        while off < FILE && calls.len() < IN_FLIGHT {
            calls.push(s.nfs.write(&c, fh, off, buf, StableHow::Unstable));
            off += CALL;
        }
        calls.next().await.unwrap().unwrap();
    }
    s.nfs.commit(&c, fh, 0, 0).await.unwrap();
}

async fn read_all(s: &NfsSession, fh: &FileHandle) -> u64 {
    let c = cred();
    let mut calls = FuturesUnordered::new();
    let (mut off, mut got) = (0, 0u64);
    while off < FILE || !calls.is_empty() {
        while off < FILE && calls.len() < IN_FLIGHT {
            calls.push(s.nfs.read(&c, fh, off, CALL as u32));
            off += CALL;
        }
        got += calls.next().await.unwrap().unwrap().data.len() as u64;
    }
    got
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (s, target) = rt.block_on(session());
    let fh = rt.block_on(file(&s));
    let buf = vec![0x5au8; CALL as usize];
    rt.block_on(write_all(&s, &fh, &buf));
    let mut g = c.benchmark_group(format!(
        "client-only 1 MiB calls x{IN_FLIGHT} in flight ({target})"
    ));
    g.throughput(Throughput::Bytes(FILE));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("sequential READ 64 MiB", |b| {
        b.to_async(&rt)
            .iter(|| async { assert_eq!(read_all(&s, &fh).await, FILE) })
    });
    g.bench_function("sequential WRITE 64 MiB (UNSTABLE + COMMIT)", |b| {
        b.to_async(&rt).iter(|| write_all(&s, &fh, &buf))
    });
    g.finish();

    // One call in flight, as `: > f` and `rm f` in a loop make them: what
    // the server and the network take before any FUSE cost.
    let mut g = c.benchmark_group(format!(
        "client-only metadata, one call at a time ({target})"
    ));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));
    let dir_name = format!("bench-meta-{}", std::process::id());
    let dir = rt
        .block_on(
            s.nfs
                .mkdir(&cred(), &s.root, dir_name.as_bytes(), sattr_none()),
        )
        .unwrap()
        .fh
        .unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    g.bench_function("GETATTR", |b| {
        b.to_async(&rt)
            .iter(|| async { s.nfs.getattr(&cred(), &fh).await.unwrap() })
    });
    g.bench_function("CREATE (unchecked) + REMOVE", |b| {
        b.to_async(&rt).iter(|| async {
            let name = format!("f{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let how = createhow3::UNCHECKED(sattr_none());
            s.nfs
                .create(&cred(), &dir, name.as_bytes(), how)
                .await
                .unwrap();
            s.nfs.remove(&cred(), &dir, name.as_bytes()).await.unwrap();
        })
    });
    g.finish();
    rt.block_on(s.nfs.rmdir(&cred(), &s.root, dir_name.as_bytes()))
        .unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
