//! Through-the-mount sequential read and write: a real FUSE mount of the
//! in-process nfs3_server (memfs) by default, or of a real server when
//! CSI_NFS_FUSE_BENCH_SOURCE names one (needs root and /dev/fuse).
//!   CSI_NFS_FUSE_BENCH_SOURCE=nfs://127.0.0.1/tmp/csi-nfs-fuse-ganesha/default/export \
//!     cargo bench --bench mount_throughput

use std::io::{Read, Write};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use csi_nfs_fuse::fs::{FsConfig, NfsFs};
use csi_nfs_fuse::fuse::FuseAdapter;
use csi_nfs_fuse::options::{MountOptions, NfsSource};
use csi_nfs_fuse::rpc::{AuthSys, Credential};
use nfs3_server::memfs::{MemFs, MemFsConfig};
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};

const FILE: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP mount_throughput: needs root and /dev/fuse");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cred = Credential::Sys(AuthSys::new(0, 0, vec![], "bench".into()));
    let mut opts = MountOptions::default();
    let (host, export, target) = match std::env::var("CSI_NFS_FUSE_BENCH_SOURCE") {
        Ok(s) => {
            let src = NfsSource::parse(&s).expect("CSI_NFS_FUSE_BENCH_SOURCE");
            (
                src.host.clone(),
                src.path.clone(),
                format!("server {}", src.host),
            )
        }
        Err(_) => {
            let mut cfg = MemFsConfig::default();
            cfg.add_file("/bench.bin", vec![1u8; FILE]);
            let port = rt.block_on(async {
                let l = NFSTcpListener::bind("127.0.0.1:0", MemFs::new(cfg).unwrap())
                    .await
                    .unwrap();
                let port = l.get_listen_port();
                tokio::spawn(async move { l.handle_forever().await });
                port
            });
            opts.port = Some(port);
            opts.mountport = Some(port);
            ("127.0.0.1".into(), "/".into(), "in-process memfs".into())
        }
    };
    let session = rt
        .block_on(csi_nfs_fuse::nfs::session::connect(
            &host,
            &export,
            &opts.connect_config(),
            &cred,
        ))
        .expect("mount");
    let _guard = rt.enter();
    let fs = NfsFs::new(session, FsConfig::from_options(&opts));
    let dir = tempfile::tempdir().unwrap();
    let mut config = fuser::Config::default();
    config.n_threads = Some(4);
    config.clone_fd = true;
    let bg = fuser::Session::new(
        FuseAdapter::new(fs, rt.handle().clone()),
        dir.path(),
        &config,
    )
    .unwrap()
    .spawn()
    .unwrap();
    let path = dir.path().join("bench.bin");
    let buf = vec![0x5au8; 1 << 20];
    // Make sure the file exists and has its full size (memfs refuses writes past EOF).
    if std::fs::metadata(&path).map(|m| m.len() as usize).ok() != Some(FILE) {
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..FILE >> 20 {
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let mut g = c.benchmark_group(format!("through the FUSE mount, 1 MiB syscalls ({target})"));
    g.throughput(Throughput::Bytes(FILE as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("sequential write 64 MiB + fsync", |b| {
        b.iter(|| {
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            for _ in 0..FILE >> 20 {
                f.write_all(&buf).unwrap();
            }
            f.sync_all().unwrap();
        })
    });
    g.bench_function("sequential read 64 MiB", |b| {
        let mut out = vec![0u8; 1 << 20];
        b.iter(|| {
            let mut f = std::fs::File::open(&path).unwrap();
            let mut n = 0;
            loop {
                match f.read(&mut out).unwrap() {
                    0 => break,
                    k => n += k,
                }
            }
            assert_eq!(n, FILE);
        })
    });
    g.finish();
    let _ = csi_nfs_fuse::mount::lazy_unmount(dir.path());
    drop(bg);
}

criterion_group!(benches, bench);
criterion_main!(benches);
