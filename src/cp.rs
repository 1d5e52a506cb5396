//! `csi-nfs-fuse cp`: copy one file to or from an NFS server with the
//! pipelined client and no FUSE, like libnfs' nfs-cp. Used by the client
//! benchmarks and handy for operators checking a server.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::stream::{FuturesOrdered, StreamExt};
use nfs3_types::nfs3::createhow3;

use crate::nfs::client::sattr_mode;
use crate::nfs::session::{self, ConnectError};
use crate::nfs::{FileHandle, NfsSession, StableHow};
use crate::options::{MountOptions, NfsSource};
use crate::rpc::{AuthSys, Credential};

/// Calls kept in flight for a streaming copy.
const WINDOW: usize = 32;

fn cred() -> Credential {
    Credential::Sys(AuthSys::current_process())
}

/// Mounts the longest prefix of `dir` the server will export, then walks
/// the rest with LOOKUP. Returns the session and the directory's handle.
pub async fn mount_dir(
    src: &NfsSource,
    dir: &str,
    opts: &MountOptions,
) -> anyhow::Result<(NfsSession, FileHandle)> {
    let cfg = opts.connect_config();
    let comps: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    let mut first_err: Option<ConnectError> = None;
    for keep in (0..=comps.len()).rev() {
        let export = format!("/{}", comps[..keep].join("/"));
        match session::connect(&src.host, &export, &cfg, &cred()).await {
            Ok(s) => {
                let mut fh = s.root.clone();
                for c in &comps[keep..] {
                    fh = s
                        .nfs
                        .lookup(&cred(), &fh, c.as_bytes())
                        .await
                        .map_err(|e| anyhow::anyhow!("{}: LOOKUP {c}: {}", src.host, e))?
                        .fh;
                }
                return Ok((s, fh));
            }
            Err(e @ ConnectError::MountDenied { .. }) => {
                first_err.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(first_err
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("nothing to mount")))
}

fn split(path: &str) -> anyhow::Result<(&str, &str)> {
    match path.rsplit_once('/') {
        Some((dir, name)) if !name.is_empty() => Ok((if dir.is_empty() { "/" } else { dir }, name)),
        _ => bail!("'{path}' does not name a file"),
    }
}

pub fn run(src: &str, dst: &str, options: &[String]) -> anyhow::Result<()> {
    let mut opts = MountOptions::default();
    for o in options {
        opts.apply(o)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let bytes = match (src.starts_with("nfs://"), dst.starts_with("nfs://")) {
        (true, false) => rt.block_on(download(&NfsSource::parse(src)?, dst, &opts))?,
        (false, true) => rt.block_on(upload(src, &NfsSource::parse(dst)?, &opts))?,
        _ => bail!("exactly one of SOURCE and DEST must be an nfs:// URL"),
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "copied {bytes} bytes in {secs:.3} s ({:.1} MiB/s)",
        bytes as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}

async fn download(src: &NfsSource, dst: &str, opts: &MountOptions) -> anyhow::Result<u64> {
    let (dir, name) = split(&src.path)?;
    let (s, dirfh) = mount_dir(src, dir, opts).await?;
    let c = cred();
    let found = s
        .nfs
        .lookup(&c, &dirfh, name.as_bytes())
        .await
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let size = match found.attr {
        Some(a) => a.size,
        None => {
            s.nfs
                .getattr(&c, &found.fh)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .attr
                .size
        }
    };
    let out = File::create(dst).with_context(|| dst.to_string())?;
    out.set_len(size)?;
    let rsize = s.rsize as u64;
    let mut next = 0u64;
    let mut inflight = FuturesOrdered::new();
    let mut done = 0u64;
    loop {
        while inflight.len() < WINDOW && next < size {
            let (nfs, fh, c, at) = (s.nfs.clone(), found.fh.clone(), c.clone(), next);
            let n = rsize.min(size - next) as u32;
            inflight.push_back(async move { (at, nfs.read(&c, &fh, at, n).await) });
            next += n as u64;
        }
        let Some((at, r)) = inflight.next().await else {
            break;
        };
        let r = r.map_err(|e| anyhow::anyhow!("READ at {at}: {e}"))?;
        out.write_all_at(&r.data, at)?;
        done += r.data.len() as u64;
    }
    Ok(done)
}

async fn upload(src: &str, dst: &NfsSource, opts: &MountOptions) -> anyhow::Result<u64> {
    let (dir, name) = split(&dst.path)?;
    let (s, dirfh) = mount_dir(dst, dir, opts).await?;
    let c = cred();
    let input = File::open(src).with_context(|| src.to_string())?;
    let size = input.metadata()?.len();
    let created = s
        .nfs
        .create(
            &c,
            &dirfh,
            name.as_bytes(),
            createhow3::UNCHECKED(sattr_mode(0o644)),
        )
        .await
        .map_err(|e| anyhow::anyhow!("CREATE {name}: {e}"))?;
    let fh = match created.fh {
        Some(fh) => fh,
        None => {
            s.nfs
                .lookup(&c, &dirfh, name.as_bytes())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .fh
        }
    };
    if created.attr.is_some_and(|a| a.size > 0) {
        let set = nfs3_types::nfs3::sattr3 {
            size: nfs3_types::nfs3::Nfs3Option::Some(0),
            ..Default::default()
        };
        s.nfs
            .setattr(&c, &fh, set, None)
            .await
            .map_err(|e| anyhow::anyhow!("truncate: {e}"))?;
    }
    let wsize = s.wsize as u64;
    let mut next = 0u64;
    let mut inflight = FuturesOrdered::new();
    let mut verfs = Vec::new();
    loop {
        while inflight.len() < WINDOW && next < size {
            let n = wsize.min(size - next) as usize;
            let mut buf = vec![0u8; n];
            input.read_exact_at(&mut buf, next)?;
            let (nfs, fh, c, at) = (s.nfs.clone(), fh.clone(), c.clone(), next);
            inflight.push_back(async move {
                let r = nfs
                    .write_bytes(&c, &fh, at, buf.into(), StableHow::Unstable)
                    .await;
                (at, n, r)
            });
            next += n as u64;
        }
        let Some((at, n, r)) = inflight.next().await else {
            break;
        };
        let w = r.map_err(|e| anyhow::anyhow!("WRITE at {at}: {e}"))?;
        if (w.count as usize) < n {
            bail!("server wrote {} of {n} bytes at {at}", w.count);
        }
        if w.committed == StableHow::Unstable {
            verfs.push((at, n, w.verf));
        }
    }
    let commit = s
        .nfs
        .commit(&c, &fh, 0, 0)
        .await
        .map_err(|e| anyhow::anyhow!("COMMIT: {e}"))?;
    // A verifier change means the server rebooted and may have lost data.
    for (at, n, verf) in verfs {
        if verf != commit.verf {
            let mut buf = vec![0u8; n];
            input.read_exact_at(&mut buf, at)?;
            s.nfs
                .write(&c, &fh, at, &buf, StableHow::FileSync)
                .await
                .map_err(|e| anyhow::anyhow!("WRITE at {at}: {e}"))?;
        }
    }
    Ok(size)
}
