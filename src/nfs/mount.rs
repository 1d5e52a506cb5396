//! MOUNT v3 (RFC 1813 appendix I) and portmap v2 (RFC 1833) calls.

use bytes::Bytes;
use nfs3_types::portmap::mapping;
use nfs3_types::xdr_codec::{Opaque, Void};

use super::types::{FileHandle, MAX_FH};
use crate::rpc::xdr::{Decode, XdrError, XdrReader, decode_list, decode_u32_array};
use crate::rpc::{Credential, RpcClient, RpcError};

pub const MOUNT_PROGRAM: u32 = 100_005;
pub const MOUNT_VERSION: u32 = 3;
pub const PORTMAP_PROGRAM: u32 = 100_000;
pub const PORTMAP_VERSION: u32 = 2;
pub const PORTMAP_PORT: u16 = 111;
const IPPROTO_TCP: u32 = 6;
const MNTPATHLEN: usize = 1024;

/// `mountstat3`, kept as a number so unknown codes still print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountStat(pub u32);

impl MountStat {
    pub fn reason(self) -> &'static str {
        match self.0 {
            1 => "not owner (MNT3ERR_PERM)",
            2 => "no such export (MNT3ERR_NOENT)",
            5 => "I/O error (MNT3ERR_IO)",
            13 => "access denied by the server's export rules (MNT3ERR_ACCES)",
            20 => "not a directory (MNT3ERR_NOTDIR)",
            22 => "invalid argument (MNT3ERR_INVAL)",
            63 => "path name too long (MNT3ERR_NAMETOOLONG)",
            10004 => "operation not supported (MNT3ERR_NOTSUPP)",
            10006 => "server fault (MNT3ERR_SERVERFAULT)",
            _ => "unknown mount status",
        }
    }
}

impl std::fmt::Display for MountStat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason(), self.0)
    }
}

#[derive(Debug, Clone)]
pub struct MountOk {
    pub fh: FileHandle,
    pub auth_flavors: Vec<u32>,
}

pub enum MountReply {
    Ok(MountOk),
    Denied(MountStat),
}

impl Decode for MountReply {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let status = r.u32()?;
        if status != 0 {
            return Ok(MountReply::Denied(MountStat(status)));
        }
        let fh = FileHandle::new(r.opaque("mount file handle", MAX_FH)?)?;
        let auth_flavors = decode_u32_array(r, "auth flavors", 64)?;
        Ok(MountReply::Ok(MountOk { fh, auth_flavors }))
    }
}

#[derive(Debug, Clone)]
pub struct ExportEntry {
    pub dir: Bytes,
    pub groups: Vec<Bytes>,
}

struct GroupName(Bytes);

impl Decode for GroupName {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self(r.opaque("export group", 255)?))
    }
}

impl Decode for ExportEntry {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let dir = r.opaque("export path", MNTPATHLEN)?;
        let groups = decode_list::<GroupName>(r, "export groups", 4096)?
            .into_iter()
            .map(|g| g.0)
            .collect();
        Ok(Self { dir, groups })
    }
}

/// A MOUNT v3 client.
#[derive(Clone)]
pub struct MountClient {
    rpc: RpcClient,
}

impl MountClient {
    pub fn new(rpc: RpcClient) -> Self {
        Self { rpc }
    }

    pub async fn null(&self) -> Result<(), RpcError> {
        self.rpc
            .call(MOUNT_PROGRAM, MOUNT_VERSION, 0, &Credential::None, &Void)
            .await
            .map(|_| ())
    }

    pub async fn mnt(&self, cred: &Credential, path: &[u8]) -> Result<MountReply, RpcError> {
        let mut r = self
            .rpc
            .call(
                MOUNT_PROGRAM,
                MOUNT_VERSION,
                1,
                cred,
                &Opaque::borrowed(path),
            )
            .await?;
        Ok(MountReply::decode(&mut r)?)
    }

    pub async fn umnt(&self, cred: &Credential, path: &[u8]) -> Result<(), RpcError> {
        self.rpc
            .call(
                MOUNT_PROGRAM,
                MOUNT_VERSION,
                3,
                cred,
                &Opaque::borrowed(path),
            )
            .await
            .map(|_| ())
    }

    pub async fn export(&self) -> Result<Vec<ExportEntry>, RpcError> {
        let mut r = self
            .rpc
            .call(MOUNT_PROGRAM, MOUNT_VERSION, 5, &Credential::None, &Void)
            .await?;
        Ok(decode_list(&mut r, "exports", 1 << 16)?)
    }
}

/// Asks the portmapper for the TCP port of `prog`/`vers`; `None` if unregistered.
pub async fn getport(rpc: &RpcClient, prog: u32, vers: u32) -> Result<Option<u16>, RpcError> {
    let args = mapping {
        prog,
        vers,
        prot: IPPROTO_TCP,
        port: 0,
    };
    let mut r = rpc
        .call(
            PORTMAP_PROGRAM,
            PORTMAP_VERSION,
            3,
            &Credential::None,
            &args,
        )
        .await?;
    decode_port(&mut r)
}

/// Decodes a GETPORT result: 0 means "not registered".
pub fn decode_port(r: &mut XdrReader) -> Result<Option<u16>, RpcError> {
    let port = r.u32()?;
    match port {
        0 => Ok(None),
        1..=65535 => Ok(Some(port as u16)),
        value => Err(XdrError::BadValue {
            what: "portmap port",
            value,
        }
        .into()),
    }
}
