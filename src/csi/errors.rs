//! The one place where internal failures become gRPC status codes.
//!
//! The rules (CSI spec v1.9.0): a missing or invalid field is
//! INVALID_ARGUMENT, an unknown volume NOT_FOUND, a pending operation on the
//! same volume ABORTED; a server that cannot be reached is UNAVAILABLE (or
//! DEADLINE_EXCEEDED when it stopped answering), so the CO retries. Messages
//! name the server, path or option involved and never carry secrets;
//! `details` stays empty.

use nfs3_types::nfs3::nfsstat3;
use tonic::{Code, Status};

use super::volume_id::IdError;
use crate::nfs::{ConnectError, NfsError};
use crate::rpc::RpcError;

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A required request field is missing.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

pub fn not_found(msg: impl Into<String>) -> Status {
    Status::not_found(msg.into())
}

pub fn internal(msg: impl Into<String>) -> Status {
    Status::internal(msg.into())
}

/// Another call for the same volume or target is still running.
pub fn aborted(what: &str) -> Status {
    Status::aborted(format!(
        "an operation on {what} is already in progress; retry later"
    ))
}

/// A volume ID or subDir/share/server that fails validation.
pub fn from_id(e: &IdError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub fn from_rpc(what: &str, e: &RpcError) -> Status {
    let code = match e {
        RpcError::TimedOut { .. } => Code::DeadlineExceeded,
        RpcError::Connect { .. } | RpcError::Io { .. } | RpcError::Shutdown => Code::Unavailable,
        RpcError::AuthError(_) => Code::PermissionDenied,
        RpcError::ProgUnavailable { .. }
        | RpcError::ProgMismatch { .. }
        | RpcError::ProcUnavailable { .. }
        | RpcError::RpcMismatch { .. } => Code::FailedPrecondition,
        RpcError::RecordTooLarge { .. }
        | RpcError::Xdr(_)
        | RpcError::GarbageArgs { .. }
        | RpcError::SystemError { .. } => Code::Internal,
    };
    Status::new(code, format!("{what}: {e}"))
}

/// The code for an NFS status returned by the server.
pub fn nfs_code(status: nfsstat3) -> Code {
    use nfsstat3::*;
    match status {
        NFS3ERR_PERM | NFS3ERR_ACCES => Code::PermissionDenied,
        NFS3ERR_NOENT | NFS3ERR_STALE | NFS3ERR_BADHANDLE => Code::NotFound,
        NFS3ERR_NOSPC | NFS3ERR_DQUOT => Code::ResourceExhausted,
        NFS3ERR_ROFS | NFS3ERR_NOTDIR | NFS3ERR_ISDIR | NFS3ERR_EXIST | NFS3ERR_NOTEMPTY
        | NFS3ERR_XDEV | NFS3ERR_NOTSUPP => Code::FailedPrecondition,
        NFS3ERR_NAMETOOLONG | NFS3ERR_INVAL => Code::InvalidArgument,
        NFS3ERR_JUKEBOX => Code::Unavailable,
        _ => Code::Internal,
    }
}

pub fn from_nfs(what: &str, e: &NfsError) -> Status {
    match e {
        NfsError::Rpc(r) => from_rpc(what, r),
        NfsError::Status(s) => Status::new(nfs_code(*s), format!("{what}: server returned {s}")),
    }
}

/// The mount handshake (portmap, MNT, FSINFO) failed.
pub fn from_connect(e: &ConnectError) -> Status {
    let code = match e {
        ConnectError::Resolve { .. }
        | ConnectError::Portmap { .. }
        | ConnectError::NotRegistered { .. } => Code::Unavailable,
        // An export that does not exist, or that the server's export rules
        // keep from this host (ganesha says ACCES for both): the share is
        // not usable as configured, which a retry will not change.
        ConnectError::MountDenied { status, .. } => match status.0 {
            2 | 20 => Code::NotFound,
            _ => Code::FailedPrecondition,
        },
        ConnectError::Rpc { source, .. } => from_rpc("", source).code(),
        ConnectError::Nfs { status, .. } => nfs_code(*status),
        ConnectError::Timeout { .. } => Code::DeadlineExceeded,
        // The server must drop its stale entry first; retrying will not help.
        ConnectError::DeletedRoot { .. } => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

pub fn from_io(what: &str, e: &std::io::Error) -> Status {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) => Code::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => Code::PermissionDenied,
        Some(libc::ENOTCONN) | Some(libc::EIO) => Code::Unavailable,
        Some(libc::ETIMEDOUT) => Code::DeadlineExceeded,
        Some(libc::ENOSPC) => Code::ResourceExhausted,
        Some(libc::EROFS) | Some(libc::ENOTDIR) | Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => {
            Code::FailedPrecondition
        }
        _ => Code::Internal,
    };
    Status::new(code, format!("{what}: {e}"))
}

/// The reason a `csi-nfs-fuse mount` child reported on its readiness pipe
/// (the text of `mount::describe`), mapped to a code.
pub fn from_mount_child(reason: &str) -> Status {
    let has = |s: &str| reason.contains(s);
    let code = if has("mount option") || has("invalid NFS source") {
        Code::InvalidArgument
    } else if has("refused to mount") {
        if has("MNT3ERR_NOENT") || has("MNT3ERR_NOTDIR") {
            Code::NotFound
        } else {
            Code::FailedPrecondition
        }
    } else if has("no answer within") || has("did not answer") && !has("portmapper") {
        Code::DeadlineExceeded
    } else if has("cannot resolve")
        || has("portmapper")
        || has("registered")
        || has("cannot connect")
        || has("connection to")
    {
        Code::Unavailable
    } else if has("returned NFS3ERR_") {
        let status = [
            ("NFS3ERR_NOENT", nfsstat3::NFS3ERR_NOENT),
            ("NFS3ERR_STALE", nfsstat3::NFS3ERR_STALE),
            ("NFS3ERR_ACCES", nfsstat3::NFS3ERR_ACCES),
            ("NFS3ERR_PERM", nfsstat3::NFS3ERR_PERM),
            ("NFS3ERR_NOTDIR", nfsstat3::NFS3ERR_NOTDIR),
            ("NFS3ERR_JUKEBOX", nfsstat3::NFS3ERR_JUKEBOX),
        ]
        .into_iter()
        .find(|(name, _)| has(name))
        .map(|(_, s)| s)
        .unwrap_or(nfsstat3::NFS3ERR_SERVERFAULT);
        nfs_code(status)
    } else {
        Code::Internal
    };
    Status::new(code, format!("mount failed: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_child_reasons() {
        for (line, code) in [
            ("unknown mount option 'bogus'", Code::InvalidArgument),
            (
                "NFS server 127.0.0.1 refused to mount '/nope': no such export (MNT3ERR_NOENT) (2)",
                Code::NotFound,
            ),
            (
                "NFS server h refused to mount '/e': access denied by the server's export rules (MNT3ERR_ACCES) (13)",
                Code::FailedPrecondition,
            ),
            (
                "NFS server h: portmapper did not answer (cannot connect to 127.0.0.1:111: Connection refused (os error 111)); set port= and mountport= if it runs without rpcbind",
                Code::Unavailable,
            ),
            (
                "NFS server h, export '/e': MNT failed: cannot connect to 127.0.0.1:1: Connection refused",
                Code::Unavailable,
            ),
            (
                "NFS server h, export '/e': no answer within 15s",
                Code::DeadlineExceeded,
            ),
            (
                "NFS server h, export '/e': GETATTR returned NFS3ERR_ACCES",
                Code::PermissionDenied,
            ),
            ("FUSE mount on /x: boom", Code::Internal),
        ] {
            assert_eq!(from_mount_child(line).code(), code, "{line}");
        }
    }
}
