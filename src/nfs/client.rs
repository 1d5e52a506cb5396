//! Typed async calls for the 22 NFSv3 procedures.

use nfs3_types::nfs3::{
    ACCESS3args, COMMIT3args, CREATE3args, FSINFO3args, FSSTAT3args, GETATTR3args, LINK3args,
    LOOKUP3args, MKDIR3args, MKNOD3args, PATHCONF3args, READ3args, READDIR3args, READDIRPLUS3args,
    READLINK3args, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args, SYMLINK3args, cookieverf3,
    createhow3, diropargs3, filename3, mknoddata3, nfspath3, nfsstat3, nfstime3, sattr3,
    symlinkdata3,
};
use nfs3_types::xdr_codec::{Opaque, Pack, Void};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::types::*;
use crate::rpc::{Credential, Decode, RpcClient, RpcConfig, RpcError};

/// Why an NFS call did not succeed: the transport failed, or the server
/// answered with an NFS3ERR status (keeping the failure body, e.g. wcc_data).
#[derive(Debug, thiserror::Error)]
pub enum Failure<F> {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("server returned {status}")]
    Nfs { status: nfsstat3, detail: F },
}

impl<F> Failure<F> {
    pub fn status(&self) -> Option<nfsstat3> {
        match self {
            Failure::Nfs { status, .. } => Some(*status),
            Failure::Rpc(_) => None,
        }
    }

    /// Drops the failure body, for callers that only need the cause.
    pub fn into_error(self) -> NfsError {
        match self {
            Failure::Rpc(e) => NfsError::Rpc(e),
            Failure::Nfs { status, .. } => NfsError::Status(status),
        }
    }
}

/// An NFS call failure without its body.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("server returned {0}")]
    Status(nfsstat3),
}

impl<F> From<Failure<F>> for NfsError {
    fn from(f: Failure<F>) -> Self {
        f.into_error()
    }
}

pub type NfsResult<T, F> = Result<T, Failure<F>>;

/// A cheap cloneable NFSv3 client over a pipelined [`RpcClient`].
#[derive(Clone)]
pub struct NfsClient {
    rpc: RpcClient,
    calls: Arc<CallCounts>,
}

/// NFSv3 procedure names, by number (RFC 1813).
const PROC_NAMES: [&str; 22] = [
    "NULL",
    "GETATTR",
    "SETATTR",
    "LOOKUP",
    "ACCESS",
    "READLINK",
    "READ",
    "WRITE",
    "CREATE",
    "MKDIR",
    "SYMLINK",
    "MKNOD",
    "REMOVE",
    "RMDIR",
    "RENAME",
    "LINK",
    "READDIR",
    "READDIRPLUS",
    "FSSTAT",
    "FSINFO",
    "PATHCONF",
    "COMMIT",
];

/// NFS3ERR_JUKEBOX: the server cannot act on the object just now (ganesha
/// answers it for a FSAL delay, an HSM server while it recalls a file) and
/// did nothing, so the call is sent again after a pause, as the kernel
/// client does (every 5 s, for ever). We start sooner and back off to 5 s;
/// a soft mount gives up once its major timeout (timeo x retrans) has
/// passed, and the caller sees the server's status (EAGAIN).
struct ServerBusy {
    started: Instant,
    pause: Duration,
    give_up: Option<Duration>,
}

const JUKEBOX_FIRST_PAUSE: Duration = Duration::from_millis(100);
const JUKEBOX_MAX_PAUSE: Duration = Duration::from_secs(5);

impl ServerBusy {
    fn new(cfg: &RpcConfig) -> Self {
        Self {
            started: Instant::now(),
            pause: JUKEBOX_FIRST_PAUSE,
            give_up: (!cfg.hard).then(|| cfg.timeo * cfg.retrans.max(1)),
        }
    }

    async fn pause(&mut self, proc: u32) -> bool {
        if self
            .give_up
            .is_some_and(|limit| self.started.elapsed() + self.pause > limit)
        {
            return false;
        }
        let procedure = PROC_NAMES.get(proc as usize).copied().unwrap_or("?");
        if self.pause == JUKEBOX_FIRST_PAUSE {
            tracing::warn!(
                procedure,
                "server busy (NFS3ERR_JUKEBOX); sending the call again"
            );
        } else {
            tracing::debug!(procedure, pause = ?self.pause, "server still busy (NFS3ERR_JUKEBOX)");
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(JUKEBOX_MAX_PAUSE);
        true
    }
}

/// Calls made per procedure, as `nfsstat -c` counts them: what a workload
/// costs in round trips, logged when the mount ends.
#[derive(Default)]
struct CallCounts([AtomicU64; PROC_NAMES.len()]);

fn fname(name: &[u8]) -> filename3<'_> {
    filename3(Opaque::borrowed(name))
}

fn dirop<'a>(dir: &FileHandle, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.to_nfs(),
        name: fname(name),
    }
}

impl NfsClient {
    pub fn new(rpc: RpcClient) -> Self {
        Self {
            rpc,
            calls: Arc::default(),
        }
    }

    fn count(&self, proc: u32) {
        if let Some(n) = self.calls.0.get(proc as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The procedures called so far and how often, in procedure order.
    pub fn call_counts(&self) -> Vec<(&'static str, u64)> {
        PROC_NAMES
            .iter()
            .zip(&self.calls.0)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn rpc(&self) -> &RpcClient {
        &self.rpc
    }

    async fn call<A: Pack, T: Decode, F: Decode>(
        &self,
        proc: u32,
        cred: &Credential,
        args: &A,
    ) -> NfsResult<T, F> {
        self.send(proc, || {
            self.rpc.call(NFS_PROGRAM, NFS_VERSION, proc, cred, args)
        })
        .await
    }

    /// Sends a call with `send` and decodes its result; a call the server
    /// answers with NFS3ERR_JUKEBOX is sent again after a pause (see
    /// [`ServerBusy`]).
    async fn send<T: Decode, F: Decode, Fut>(
        &self,
        proc: u32,
        mut send: impl FnMut() -> Fut,
    ) -> NfsResult<T, F>
    where
        Fut: std::future::Future<Output = Result<crate::rpc::XdrReader, RpcError>>,
    {
        let mut busy: Option<ServerBusy> = None;
        loop {
            self.count(proc);
            let result = decode_result(&mut send().await?);
            let jukebox = matches!(
                result,
                Err(Failure::Nfs {
                    status: nfsstat3::NFS3ERR_JUKEBOX,
                    ..
                })
            );
            if !jukebox
                || !busy
                    .get_or_insert_with(|| ServerBusy::new(self.rpc.config()))
                    .pause(proc)
                    .await
            {
                return result;
            }
        }
    }

    pub async fn null(&self, cred: &Credential) -> Result<(), RpcError> {
        self.count(0);
        self.rpc
            .call(NFS_PROGRAM, NFS_VERSION, 0, cred, &Void)
            .await
            .map(|_| ())
    }

    pub async fn getattr(&self, cred: &Credential, fh: &FileHandle) -> NfsResult<GetattrOk, ()> {
        self.call(
            1,
            cred,
            &GETATTR3args {
                object: fh.to_nfs(),
            },
        )
        .await
    }

    /// SETATTR; `guard` is the ctime the object must still have (RFC 1813 §3.3.2).
    pub async fn setattr(
        &self,
        cred: &Credential,
        fh: &FileHandle,
        attrs: sattr3,
        guard: Option<NfsTime>,
    ) -> NfsResult<SetattrOk, WccFail> {
        let guard = match guard {
            Some(t) => nfs3_types::nfs3::Nfs3Option::Some(nfstime3 {
                seconds: t.seconds,
                nseconds: t.nseconds,
            }),
            None => nfs3_types::nfs3::Nfs3Option::None,
        };
        let args = SETATTR3args {
            object: fh.to_nfs(),
            new_attributes: attrs,
            guard,
        };
        self.call(2, cred, &args).await
    }

    pub async fn lookup(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
    ) -> NfsResult<LookupOk, AttrFail> {
        self.call(
            3,
            cred,
            &LOOKUP3args {
                what: dirop(dir, name),
            },
        )
        .await
    }

    pub async fn access(
        &self,
        cred: &Credential,
        fh: &FileHandle,
        access: u32,
    ) -> NfsResult<AccessOk, AttrFail> {
        let args = ACCESS3args {
            object: fh.to_nfs(),
            access,
        };
        self.call(4, cred, &args).await
    }

    pub async fn readlink(
        &self,
        cred: &Credential,
        fh: &FileHandle,
    ) -> NfsResult<ReadlinkOk, AttrFail> {
        self.call(
            5,
            cred,
            &READLINK3args {
                symlink: fh.to_nfs(),
            },
        )
        .await
    }

    pub async fn read(
        &self,
        cred: &Credential,
        fh: &FileHandle,
        offset: u64,
        count: u32,
    ) -> NfsResult<ReadOk, AttrFail> {
        let args = READ3args {
            file: fh.to_nfs(),
            offset,
            count,
        };
        self.call(6, cred, &args).await
    }

    /// WRITE from a borrowed slice: copied once, into a buffer of the call's own.
    pub async fn write(
        &self,
        cred: &Credential,
        fh: &FileHandle,
        offset: u64,
        data: &[u8],
        stable: StableHow,
    ) -> NfsResult<WriteOk, WccFail> {
        let data = bytes::Bytes::copy_from_slice(data);
        self.write_bytes(cred, fh, offset, data, stable).await
    }

    /// WRITE. The data is sent from `data` itself, never copied into the call.
    pub async fn write_bytes(
        &self,
        cred: &Credential,
        fh: &FileHandle,
        offset: u64,
        data: bytes::Bytes,
        stable: StableHow,
    ) -> NfsResult<WriteOk, WccFail> {
        // WRITE3args up to the data's length: the same bytes nfs3_types
        // would produce, with the opaque's body sent from `data`.
        let head = WriteHead {
            file: fh.to_nfs(),
            offset,
            count: data.len() as u32,
            stable: stable.to_nfs(),
        };
        self.send(7, || {
            self.rpc
                .call_with_opaque((NFS_PROGRAM, NFS_VERSION, 7), cred, &head, data.clone())
        })
        .await
    }

    pub async fn create(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
        how: createhow3,
    ) -> NfsResult<CreatedOk, WccFail> {
        let args = CREATE3args {
            where_: dirop(dir, name),
            how,
        };
        self.call(8, cred, &args).await
    }

    pub async fn mkdir(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
        attrs: sattr3,
    ) -> NfsResult<CreatedOk, WccFail> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes: attrs,
        };
        self.call(9, cred, &args).await
    }

    pub async fn symlink(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
        target: &[u8],
        attrs: sattr3,
    ) -> NfsResult<CreatedOk, WccFail> {
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: attrs,
                symlink_data: nfspath3(Opaque::borrowed(target)),
            },
        };
        self.call(10, cred, &args).await
    }

    pub async fn mknod(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
        what: mknoddata3,
    ) -> NfsResult<CreatedOk, WccFail> {
        let args = MKNOD3args {
            where_: dirop(dir, name),
            what,
        };
        self.call(11, cred, &args).await
    }

    pub async fn remove(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
    ) -> NfsResult<RemoveOk, WccFail> {
        self.call(
            12,
            cred,
            &REMOVE3args {
                object: dirop(dir, name),
            },
        )
        .await
    }

    pub async fn rmdir(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        name: &[u8],
    ) -> NfsResult<RemoveOk, WccFail> {
        self.call(
            13,
            cred,
            &RMDIR3args {
                object: dirop(dir, name),
            },
        )
        .await
    }

    pub async fn rename(
        &self,
        cred: &Credential,
        from_dir: &FileHandle,
        from: &[u8],
        to_dir: &FileHandle,
        to: &[u8],
    ) -> NfsResult<RenameOk, RenameFail> {
        let args = RENAME3args {
            from: dirop(from_dir, from),
            to: dirop(to_dir, to),
        };
        self.call(14, cred, &args).await
    }

    pub async fn link(
        &self,
        cred: &Credential,
        file: &FileHandle,
        dir: &FileHandle,
        name: &[u8],
    ) -> NfsResult<LinkOk, LinkFail> {
        let args = LINK3args {
            file: file.to_nfs(),
            link: dirop(dir, name),
        };
        self.call(15, cred, &args).await
    }

    pub async fn readdir(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        cookie: u64,
        cookieverf: CookieVerf,
        count: u32,
    ) -> NfsResult<ReaddirOk, AttrFail> {
        let args = READDIR3args {
            dir: dir.to_nfs(),
            cookie,
            cookieverf: cookieverf3(cookieverf.0),
            count,
        };
        self.call(16, cred, &args).await
    }

    pub async fn readdirplus(
        &self,
        cred: &Credential,
        dir: &FileHandle,
        cookie: u64,
        cookieverf: CookieVerf,
        dircount: u32,
        maxcount: u32,
    ) -> NfsResult<ReaddirplusOk, AttrFail> {
        let args = READDIRPLUS3args {
            dir: dir.to_nfs(),
            cookie,
            cookieverf: cookieverf3(cookieverf.0),
            dircount,
            maxcount,
        };
        self.call(17, cred, &args).await
    }

    pub async fn fsstat(
        &self,
        cred: &Credential,
        fh: &FileHandle,
    ) -> NfsResult<FsstatOk, AttrFail> {
        self.call(
            18,
            cred,
            &FSSTAT3args {
                fsroot: fh.to_nfs(),
            },
        )
        .await
    }

    pub async fn fsinfo(
        &self,
        cred: &Credential,
        fh: &FileHandle,
    ) -> NfsResult<FsinfoOk, AttrFail> {
        self.call(
            19,
            cred,
            &FSINFO3args {
                fsroot: fh.to_nfs(),
            },
        )
        .await
    }

    pub async fn pathconf(
        &self,
        cred: &Credential,
        fh: &FileHandle,
    ) -> NfsResult<PathconfOk, AttrFail> {
        self.call(
            20,
            cred,
            &PATHCONF3args {
                object: fh.to_nfs(),
            },
        )
        .await
    }

    /// COMMIT `count` bytes from `offset`; (0, 0) commits the whole file.
    pub async fn commit(
        &self,
        cred: &Credential,
        fh: &FileHandle,
        offset: u64,
        count: u32,
    ) -> NfsResult<CommitOk, WccFail> {
        let args = COMMIT3args {
            file: fh.to_nfs(),
            offset,
            count,
        };
        self.call(21, cred, &args).await
    }
}

/// Builds a `sattr3` that changes nothing; callers set the fields they need.
pub fn sattr_none() -> sattr3 {
    sattr3::default()
}

/// Helper for `sattr3` mode-only changes (MKDIR, CREATE).
pub fn sattr_mode(mode: u32) -> sattr3 {
    sattr3 {
        mode: nfs3_types::nfs3::Nfs3Option::Some(mode),
        ..Default::default()
    }
}

/// Reads a whole READDIRPLUS listing, following cookies; for tools and tests.
pub async fn readdirplus_all(
    nfs: &NfsClient,
    cred: &Credential,
    dir: &FileHandle,
    maxcount: u32,
) -> Result<Vec<DirEntryPlus>, NfsError> {
    let mut out = Vec::new();
    let mut cookie = 0;
    let mut verf = CookieVerf::default();
    loop {
        let page = nfs
            .readdirplus(cred, dir, cookie, verf, maxcount / 4, maxcount)
            .await?;
        verf = page.cookieverf;
        if let Some(last) = page.entries.last() {
            cookie = last.cookie;
        }
        let empty = page.entries.is_empty();
        out.extend(page.entries);
        if page.eof {
            return Ok(out);
        }
        if empty {
            // A server that returns no entries and no EOF would loop us forever.
            return Err(NfsError::Status(nfsstat3::NFS3ERR_SERVERFAULT));
        }
    }
}

/// The status, then the procedure's success or failure body.
fn decode_result<T: Decode, F: Decode>(r: &mut crate::rpc::XdrReader) -> NfsResult<T, F> {
    let status = decode_status(r).map_err(RpcError::from)?;
    if status == nfsstat3::NFS3_OK {
        Ok(T::decode(r).map_err(RpcError::from)?)
    } else {
        let detail = F::decode(r).map_err(RpcError::from)?;
        Err(Failure::Nfs { status, detail })
    }
}

/// WRITE3args without the data: file, offset, count, stable and the
/// opaque's length (which equals count).
struct WriteHead {
    file: nfs3_types::nfs3::nfs_fh3,
    offset: u64,
    count: u32,
    stable: nfs3_types::nfs3::stable_how,
}

impl Pack for WriteHead {
    fn packed_size(&self) -> usize {
        self.file.packed_size() + 8 + 4 + self.stable.packed_size() + 4
    }

    fn pack(&self, out: &mut impl std::io::Write) -> nfs3_types::xdr_codec::Result<usize> {
        Ok(self.file.pack(out)?
            + self.offset.pack(out)?
            + self.count.pack(out)?
            + self.stable.pack(out)?
            + self.count.pack(out)?)
    }
}

#[cfg(test)]
mod write_encoding_tests {
    use nfs3_types::nfs3::WRITE3args;

    use super::*;
    use crate::rpc::transport::CallBody;

    /// The split encoding (head, then the caller's buffer, then padding)
    /// must put the same bytes on the wire as nfs3_types' WRITE3args, for
    /// every padding length, and any range of it must read back in order.
    #[test]
    fn split_write_matches_nfs3_types_encoding() {
        let fh = FileHandle::new(vec![7; 28]).unwrap();
        for len in [0usize, 1, 2, 3, 4, 5, 1023] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut expected = Vec::new();
            WRITE3args {
                file: fh.to_nfs(),
                offset: 1 << 33,
                count: len as u32,
                stable: StableHow::Unstable.to_nfs(),
                data: Opaque::borrowed(&data),
            }
            .pack(&mut expected)
            .unwrap();
            let head = WriteHead {
                file: fh.to_nfs(),
                offset: 1 << 33,
                count: len as u32,
                stable: StableHow::Unstable.to_nfs(),
            };
            let mut h = Vec::new();
            assert_eq!(head.pack(&mut h).unwrap(), head.packed_size());
            let body = CallBody::with_opaque(h.into(), data.into());
            assert_eq!(body.len(), expected.len(), "length {len}");
            let whole: Vec<u8> = body.slices(0..body.len()).flatten().copied().collect();
            assert_eq!(whole, expected, "length {len}");
            for (a, b) in [
                (0, 1),
                (3, 40),
                (40, body.len()),
                (body.len() / 2, body.len()),
            ] {
                let part: Vec<u8> = body.slices(a..b).flatten().copied().collect();
                assert_eq!(part, expected[a..b], "length {len}, bytes {a}..{b}");
            }
        }
    }
}
