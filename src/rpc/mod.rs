//! ONC RPC (RFC 5531) over TCP: record marking, a pipelined multiplexing
//! transport with `nconnect` connections, AUTH_SYS, deadlines and reconnects.

pub mod auth;
pub mod record;
pub mod transport;
pub mod xdr;

use std::net::SocketAddr;
use std::time::Duration;

pub use auth::{AuthSys, Credential};
pub use transport::{RpcClient, RpcConfig};
pub use xdr::{Decode, XdrError, XdrReader};

/// Failures of the RPC layer. NFS status codes are not errors here; they live
/// in the typed results of `crate::nfs`.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("RPC record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    #[error("malformed RPC reply: {0}")]
    Xdr(#[from] XdrError),
    #[error("server {addr} did not answer {what} within {after:?} (soft mount)")]
    TimedOut {
        addr: SocketAddr,
        what: String,
        after: Duration,
    },
    #[error("server does not offer RPC program {prog} version {vers}")]
    ProgUnavailable { prog: u32, vers: u32 },
    #[error("server supports program {prog} only in versions {low}..={high}")]
    ProgMismatch { prog: u32, low: u32, high: u32 },
    #[error("server does not implement procedure {proc} of program {prog}")]
    ProcUnavailable { prog: u32, proc: u32 },
    #[error("server could not decode the arguments of {what}")]
    GarbageArgs { what: String },
    #[error("server reported a system error for {what}")]
    SystemError { what: String },
    #[error("server speaks RPC versions {low}..={high}, not 2")]
    RpcMismatch { low: u32, high: u32 },
    #[error("server rejected the credentials: {0}")]
    AuthError(AuthStat),
    #[error("the RPC client was shut down")]
    Shutdown,
}

impl RpcError {
    /// Whether this is a timeout, so callers can map it to ETIMEDOUT.
    pub fn is_timeout(&self) -> bool {
        matches!(self, RpcError::TimedOut { .. })
    }
}

/// RFC 5531 `auth_stat`, kept as a number when unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthStat(pub u32);

impl std::fmt::Display for AuthStat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            1 => "AUTH_BADCRED (bad credential)",
            2 => "AUTH_REJECTEDCRED (client must begin a new session)",
            3 => "AUTH_BADVERF (bad verifier)",
            4 => "AUTH_REJECTEDVERF (verifier expired or replayed)",
            5 => "AUTH_TOOWEAK (rejected for security reasons, e.g. a non-privileged source port)",
            6 => "AUTH_INVALIDRESP",
            7 => "AUTH_FAILED",
            n => return write!(f, "auth_stat {n}"),
        };
        f.write_str(name)
    }
}

/// Parses the reply header of `record` and returns a reader positioned at the
/// procedure's results.
pub fn parse_reply(
    record: bytes::Bytes,
    prog: u32,
    vers: u32,
    proc: u32,
) -> Result<XdrReader, RpcError> {
    let mut r = XdrReader::new(record);
    let _xid = r.u32()?;
    let mtype = r.u32()?;
    if mtype != 1 {
        return Err(XdrError::BadValue {
            what: "msg_type (expected REPLY)",
            value: mtype,
        }
        .into());
    }
    let what = || format!("program {prog} procedure {proc}");
    match r.u32()? {
        0 => {
            let _verf_flavor = r.u32()?;
            r.opaque("reply verifier", 400)?;
            match r.u32()? {
                0 => Ok(r),
                1 => Err(RpcError::ProgUnavailable { prog, vers }),
                2 => {
                    let low = r.u32()?;
                    let high = r.u32()?;
                    Err(RpcError::ProgMismatch { prog, low, high })
                }
                3 => Err(RpcError::ProcUnavailable { prog, proc }),
                4 => Err(RpcError::GarbageArgs { what: what() }),
                5 => Err(RpcError::SystemError { what: what() }),
                value => Err(XdrError::BadValue {
                    what: "accept_stat",
                    value,
                }
                .into()),
            }
        }
        1 => match r.u32()? {
            0 => {
                let low = r.u32()?;
                let high = r.u32()?;
                Err(RpcError::RpcMismatch { low, high })
            }
            1 => Err(RpcError::AuthError(AuthStat(r.u32()?))),
            value => Err(XdrError::BadValue {
                what: "reject_stat",
                value,
            }
            .into()),
        },
        value => Err(XdrError::BadValue {
            what: "reply_stat",
            value,
        }
        .into()),
    }
}
