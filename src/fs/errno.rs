//! The one place where NFS and RPC failures become errno values.

use nfs3_types::nfs3::nfsstat3;

use crate::nfs::{Failure, NfsError};
use crate::rpc::RpcError;

/// A failed filesystem operation, as the errno FUSE will return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsError(pub i32);

impl FsError {
    pub const NOENT: FsError = FsError(libc::ENOENT);
    pub const IO: FsError = FsError(libc::EIO);
    pub const INVAL: FsError = FsError(libc::EINVAL);
    pub const BADF: FsError = FsError(libc::EBADF);
    pub const NOTDIR: FsError = FsError(libc::ENOTDIR);
    pub const ROFS: FsError = FsError(libc::EROFS);
    pub const NAMETOOLONG: FsError = FsError(libc::ENAMETOOLONG);
    pub const STALE: FsError = FsError(libc::ESTALE);
    pub const NOTSUP: FsError = FsError(libc::EOPNOTSUPP);
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for FsError {}

/// NFS3ERR → errno (RFC 1813 §2.6 and the Linux client's nfs3_stat_to_errno).
pub fn errno_of_status(s: nfsstat3) -> i32 {
    use nfsstat3::*;
    match s {
        NFS3_OK => 0,
        NFS3ERR_PERM => libc::EPERM,
        NFS3ERR_NOENT => libc::ENOENT,
        NFS3ERR_IO => libc::EIO,
        NFS3ERR_NXIO => libc::ENXIO,
        NFS3ERR_ACCES => libc::EACCES,
        NFS3ERR_EXIST => libc::EEXIST,
        NFS3ERR_XDEV => libc::EXDEV,
        NFS3ERR_NODEV => libc::ENODEV,
        NFS3ERR_NOTDIR => libc::ENOTDIR,
        NFS3ERR_ISDIR => libc::EISDIR,
        NFS3ERR_INVAL => libc::EINVAL,
        NFS3ERR_FBIG => libc::EFBIG,
        NFS3ERR_NOSPC => libc::ENOSPC,
        NFS3ERR_ROFS => libc::EROFS,
        NFS3ERR_MLINK => libc::EMLINK,
        NFS3ERR_NAMETOOLONG => libc::ENAMETOOLONG,
        NFS3ERR_NOTEMPTY => libc::ENOTEMPTY,
        NFS3ERR_DQUOT => libc::EDQUOT,
        NFS3ERR_STALE => libc::ESTALE,
        NFS3ERR_REMOTE => libc::EREMOTE,
        NFS3ERR_BADHANDLE => libc::ESTALE,
        NFS3ERR_NOT_SYNC => libc::EAGAIN,
        NFS3ERR_BAD_COOKIE => libc::EINVAL,
        NFS3ERR_NOTSUPP => libc::EOPNOTSUPP,
        NFS3ERR_TOOSMALL => libc::EINVAL,
        NFS3ERR_SERVERFAULT => libc::EREMOTEIO,
        NFS3ERR_BADTYPE => libc::EINVAL,
        NFS3ERR_JUKEBOX => libc::EAGAIN,
    }
}

/// Transport failure → errno. A soft timeout is EIO, as on a kernel `soft` mount.
pub fn errno_of_rpc(e: &RpcError) -> i32 {
    match e {
        RpcError::TimedOut { .. } => libc::EIO,
        RpcError::AuthError(_) => libc::EACCES,
        RpcError::ProcUnavailable { .. } => libc::EOPNOTSUPP,
        RpcError::Connect { .. } => libc::EIO,
        _ => libc::EIO,
    }
}

impl From<RpcError> for FsError {
    fn from(e: RpcError) -> Self {
        FsError(errno_of_rpc(&e))
    }
}

impl From<NfsError> for FsError {
    fn from(e: NfsError) -> Self {
        match e {
            NfsError::Rpc(r) => r.into(),
            NfsError::Status(s) => FsError(errno_of_status(s)),
        }
    }
}

impl<F> From<Failure<F>> for FsError {
    fn from(f: Failure<F>) -> Self {
        f.into_error().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfsstat3::*;

    #[test]
    fn every_nfs_status_has_its_errno() {
        let table = [
            (NFS3ERR_PERM, libc::EPERM),
            (NFS3ERR_NOENT, libc::ENOENT),
            (NFS3ERR_IO, libc::EIO),
            (NFS3ERR_NXIO, libc::ENXIO),
            (NFS3ERR_ACCES, libc::EACCES),
            (NFS3ERR_EXIST, libc::EEXIST),
            (NFS3ERR_XDEV, libc::EXDEV),
            (NFS3ERR_NODEV, libc::ENODEV),
            (NFS3ERR_NOTDIR, libc::ENOTDIR),
            (NFS3ERR_ISDIR, libc::EISDIR),
            (NFS3ERR_INVAL, libc::EINVAL),
            (NFS3ERR_FBIG, libc::EFBIG),
            (NFS3ERR_NOSPC, libc::ENOSPC),
            (NFS3ERR_ROFS, libc::EROFS),
            (NFS3ERR_MLINK, libc::EMLINK),
            (NFS3ERR_NAMETOOLONG, libc::ENAMETOOLONG),
            (NFS3ERR_NOTEMPTY, libc::ENOTEMPTY),
            (NFS3ERR_DQUOT, libc::EDQUOT),
            (NFS3ERR_STALE, libc::ESTALE),
            (NFS3ERR_REMOTE, libc::EREMOTE),
            (NFS3ERR_BADHANDLE, libc::ESTALE),
            (NFS3ERR_NOT_SYNC, libc::EAGAIN),
            (NFS3ERR_BAD_COOKIE, libc::EINVAL),
            (NFS3ERR_NOTSUPP, libc::EOPNOTSUPP),
            (NFS3ERR_TOOSMALL, libc::EINVAL),
            (NFS3ERR_SERVERFAULT, libc::EREMOTEIO),
            (NFS3ERR_BADTYPE, libc::EINVAL),
            (NFS3ERR_JUKEBOX, libc::EAGAIN),
        ];
        for (status, errno) in table {
            assert_eq!(errno_of_status(status), errno, "{status}");
        }
        assert_eq!(errno_of_status(NFS3_OK), 0);
    }
}
