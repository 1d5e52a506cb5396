//! A randomized read/write/truncate checker in the spirit of xfstests' fsx:
//! every operation goes through the FUSE mount and is checked against an
//! in-memory model. CSI_NFS_FUSE_FSX_OPS sets the count (CI: 4000);
//! CSI_NFS_FUSE_FSX_SEED replays a run.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use common::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const MAX_LEN: u64 = 3 << 20;

#[test]
fn fsx_random_operations_match_the_model() {
    let Some(g) = ganesha() else { return };
    let ops: usize = std::env::var("CSI_NFS_FUSE_FSX_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let seed: u64 = std::env::var("CSI_NFS_FUSE_FSX_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand_seed);
    eprintln!("fsx: {ops} operations, seed {seed} (CSI_NFS_FUSE_FSX_SEED to replay)");
    let (m, server) = g.fuse_mount("fsx", "");
    let path = m.path("fsx.bin");
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap()
    };
    let mut f: File = open();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(seed | 1);
    let trace = std::env::var("CSI_NFS_FUSE_FSX_TRACE").is_ok();
    let mut last: String;
    for op in 0..ops {
        match rng.below(100) {
            0..=39 => {
                let off = rng.below(MAX_LEN);
                let cap = if rng.below(4) == 0 { 1 << 20 } else { 65536 };
                let len = 1 + rng.below(cap);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                last = format!("write {off}+{len}");
                f.write_all_at(&data, off).unwrap();
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            40..=74 => {
                let off = rng.below(model.len() as u64 + 4096);
                let len = 1 + rng.below(200_000);
                last = format!("read {off}+{len}");
                let mut buf = vec![0u8; len as usize];
                let n = read_full(&f, &mut buf, off);
                let want = model
                    .get(off as usize..)
                    .map_or(&[][..], |s| &s[..s.len().min(len as usize)]);
                assert_eq!(
                    n,
                    want.len(),
                    "op {op} (seed {seed}): short read at {off}+{len}"
                );
                if buf[..n] != *want {
                    let first = buf[..n].iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "op {op} (seed {seed}): data differs at byte {}",
                        off + first as u64
                    );
                }
            }
            75..=84 => {
                let size = rng.below(MAX_LEN);
                last = format!("truncate {size}");
                f.set_len(size).unwrap();
                model.resize(size as usize, 0);
            }
            85..=94 => {
                last = "reopen".into();
                drop(f);
                f = open();
            }
            _ => {
                last = "fsync".into();
                f.sync_all().unwrap()
            }
        }
        if trace {
            eprintln!("{op}: {last} (model size {})", model.len());
        }
        assert_eq!(
            f.metadata().unwrap().len(),
            model.len() as u64,
            "op {op} ({last}, seed {seed}): size"
        );
    }
    drop(f);
    let on_server = std::fs::read(server.join("fsx.bin")).unwrap();
    assert!(
        on_server == model,
        "seed {seed}: the server's copy differs from the model after close"
    );
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
