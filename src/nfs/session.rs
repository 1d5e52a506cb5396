//! The mount handshake: resolve the server, ask portmap for the ports, MNT
//! the export, then FSINFO to size transfers. Every step has a deadline and
//! an error that names the server, the export and the reason.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::client::{Failure, NfsClient};
use super::mount::{self, MountClient, MountReply, MountStat};
use super::types::{Fattr, FileHandle, FileType, FsinfoOk, NFS_PROGRAM, NFS_VERSION};
use crate::rpc::{Credential, RpcClient, RpcConfig, RpcError};

/// FUSE hands us at most 1 MiB per request, so larger transfers buy nothing.
pub const MAX_TRANSFER: u32 = 1 << 20;
const DEFAULT_NFS_PORT: u16 = 2049;

#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Transport settings for the NFS data channel.
    pub rpc: RpcConfig,
    /// NFS port; asked of the portmapper when unset.
    pub port: Option<u16>,
    /// MOUNT port; asked of the portmapper when unset.
    pub mountport: Option<u16>,
    pub rsize: Option<u32>,
    pub wsize: Option<u32>,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            rpc: RpcConfig::default(),
            port: None,
            mountport: None,
            rsize: None,
            wsize: None,
            handshake_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve NFS server '{host}': {reason}")]
    Resolve { host: String, reason: String },
    #[error(
        "NFS server {server}: portmapper did not answer ({source}); set port= and mountport= if it runs without rpcbind"
    )]
    Portmap { server: String, source: RpcError },
    #[error("NFS server {server} has no {what} registered with its portmapper")]
    NotRegistered { server: String, what: &'static str },
    #[error("NFS server {server} refused to mount '{export}': {status}")]
    MountDenied {
        server: String,
        export: String,
        status: MountStat,
    },
    #[error("NFS server {server}, export '{export}': {step} failed: {source}")]
    Rpc {
        server: String,
        export: String,
        step: &'static str,
        source: RpcError,
    },
    #[error("NFS server {server}, export '{export}': {step} returned {status}")]
    Nfs {
        server: String,
        export: String,
        step: &'static str,
        status: nfs3_types::nfs3::nfsstat3,
    },
    #[error("NFS server {server}, export '{export}': no answer within {after:?}")]
    Timeout {
        server: String,
        export: String,
        after: Duration,
    },
    /// The server still caches a directory deleted behind its back (removed
    /// and made again on its disk, not through NFS) and hands out that.
    /// Every create in it would fail with ENOENT; the kernel client mounts
    /// it all the same.
    #[error(
        "NFS server {server}, export '{export}': the server answered with a deleted directory (no links left); it still caches the one that was removed, so make the directory through NFS or restart the server"
    )]
    DeletedRoot { server: String, export: String },
}

/// A mounted export: the NFS channel, the root handle and negotiated sizes.
#[derive(Clone)]
pub struct NfsSession {
    pub nfs: NfsClient,
    pub root: FileHandle,
    pub root_attr: Fattr,
    pub fsinfo: FsinfoOk,
    pub rsize: u32,
    pub wsize: u32,
    pub server: SocketAddr,
    pub host: String,
    pub export: String,
    pub mountport: u16,
}

/// Resolves `host` (an IP literal or a name) to one address, preferring IPv4.
pub async fn resolve(host: &str) -> Result<IpAddr, ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip);
    }
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(Duration::from_secs(10), tokio::net::lookup_host((bare, 0)))
            .await
            .map_err(|_| ConnectError::Resolve {
                host: host.into(),
                reason: "name lookup timed out".into(),
            })?
            .map_err(|e| ConnectError::Resolve {
                host: host.into(),
                reason: e.to_string(),
            })?
            .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| a.ip())
        .ok_or_else(|| ConnectError::Resolve {
            host: host.into(),
            reason: "no addresses".into(),
        })
}

fn clamp_transfer(user: Option<u32>, server_max: u32) -> u32 {
    let server_max = if server_max == 0 {
        MAX_TRANSFER
    } else {
        server_max
    };
    let v = user
        .unwrap_or(MAX_TRANSFER)
        .min(server_max)
        .min(MAX_TRANSFER);
    (v & !4095).max(4096)
}

/// Mounts `export` on `host` and returns the session for NFS calls.
pub async fn connect(
    host: &str,
    export: &str,
    cfg: &ConnectConfig,
    cred: &Credential,
) -> Result<NfsSession, ConnectError> {
    let deadline = cfg.handshake_timeout;
    match tokio::time::timeout(deadline, connect_inner(host, export, cfg, cred)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            server: host.into(),
            export: export.into(),
            after: deadline,
        }),
    }
}

fn handshake_rpc(cfg: &ConnectConfig) -> RpcConfig {
    let per_try = (cfg.handshake_timeout / 3).max(Duration::from_millis(200));
    RpcConfig {
        timeo: per_try,
        retrans: 3,
        hard: false,
        nconnect: 1,
        fail_fast_connect: true,
        connect_timeout: per_try,
        ..cfg.rpc.clone()
    }
}

async fn connect_inner(
    host: &str,
    export: &str,
    cfg: &ConnectConfig,
    cred: &Credential,
) -> Result<NfsSession, ConnectError> {
    let ip = resolve(host).await?;
    let server = host.to_string();
    let hs = handshake_rpc(cfg);
    let rpc_err = |step: &'static str| {
        let server = server.clone();
        move |source| ConnectError::Rpc {
            server,
            export: export.into(),
            step,
            source,
        }
    };

    let (nfs_port, mount_port) = match (cfg.port, cfg.mountport) {
        (Some(p), Some(m)) => (p, m),
        (port, mountport) => {
            let pmap = RpcClient::new(SocketAddr::new(ip, mount::PORTMAP_PORT), hs.clone());
            let portmap_err = |source| ConnectError::Portmap {
                server: server.clone(),
                source,
            };
            let m = match mountport {
                Some(m) => m,
                None => mount::getport(&pmap, mount::MOUNT_PROGRAM, mount::MOUNT_VERSION)
                    .await
                    .map_err(portmap_err)?
                    .ok_or_else(|| ConnectError::NotRegistered {
                        server: server.clone(),
                        what: "MOUNT v3 over TCP",
                    })?,
            };
            let p = match port {
                Some(p) => p,
                None => mount::getport(&pmap, NFS_PROGRAM, NFS_VERSION)
                    .await
                    .map_err(portmap_err)?
                    .unwrap_or(DEFAULT_NFS_PORT),
            };
            (p, m)
        }
    };

    let mountd = MountClient::new(RpcClient::new(SocketAddr::new(ip, mount_port), hs));
    let root = match mountd
        .mnt(cred, export.as_bytes())
        .await
        .map_err(rpc_err("MNT"))?
    {
        MountReply::Ok(ok) => ok.fh,
        MountReply::Denied(status) => {
            return Err(ConnectError::MountDenied {
                server,
                export: export.into(),
                status,
            });
        }
    };
    drop(mountd);

    let addr = SocketAddr::new(ip, nfs_port);
    let nfs = NfsClient::new(RpcClient::new(addr, cfg.rpc.clone()));
    let fsinfo = nfs
        .fsinfo(cred, &root)
        .await
        .map_err(|f| nfs_failure(&server, export, "FSINFO", f))?;
    let root_attr = nfs
        .getattr(cred, &root)
        .await
        .map_err(|f| nfs_failure(&server, export, "GETATTR", f))?
        .attr;
    if root_attr.ftype == FileType::Directory && root_attr.nlink == 0 {
        return Err(ConnectError::DeletedRoot {
            server,
            export: export.into(),
        });
    }
    let rsize = clamp_transfer(cfg.rsize, fsinfo.rtmax);
    let wsize = clamp_transfer(cfg.wsize, fsinfo.wtmax);
    tracing::debug!(
        rtmax = fsinfo.rtmax,
        wtmax = fsinfo.wtmax,
        time_delta = ?fsinfo.time_delta,
        properties = fsinfo.properties,
        "FSINFO"
    );
    Ok(NfsSession {
        nfs,
        root,
        root_attr,
        fsinfo,
        rsize,
        wsize,
        server: addr,
        host: server,
        export: export.into(),
        mountport: mount_port,
    })
}

fn nfs_failure<F>(server: &str, export: &str, step: &'static str, f: Failure<F>) -> ConnectError {
    match f {
        Failure::Rpc(source) => ConnectError::Rpc {
            server: server.into(),
            export: export.into(),
            step,
            source,
        },
        Failure::Nfs { status, .. } => ConnectError::Nfs {
            server: server.into(),
            export: export.into(),
            step,
            status,
        },
    }
}

impl NfsSession {
    /// MNT again and fetch the root's attributes: the export may have been
    /// deleted and re-created on the server, leaving our root handle stale.
    pub async fn remount(&self, cred: &Credential) -> Result<(FileHandle, Fattr), ConnectError> {
        let cfg = RpcConfig {
            timeo: Duration::from_secs(5),
            retrans: 2,
            hard: false,
            fail_fast_connect: true,
            connect_timeout: Duration::from_secs(5),
            ..self.nfs.rpc().config().clone()
        };
        let mountd = MountClient::new(RpcClient::new(
            SocketAddr::new(self.server.ip(), self.mountport),
            cfg,
        ));
        let rpc_err = |source| ConnectError::Rpc {
            server: self.host.clone(),
            export: self.export.clone(),
            step: "MNT",
            source,
        };
        let fh = match mountd
            .mnt(cred, self.export.as_bytes())
            .await
            .map_err(rpc_err)?
        {
            MountReply::Ok(ok) => ok.fh,
            MountReply::Denied(status) => {
                return Err(ConnectError::MountDenied {
                    server: self.host.clone(),
                    export: self.export.clone(),
                    status,
                });
            }
        };
        let attr = self
            .nfs
            .getattr(cred, &fh)
            .await
            .map_err(|f| nfs_failure(&self.host, &self.export, "GETATTR", f))?
            .attr;
        Ok((fh, attr))
    }

    /// Tells mountd we are done (UMNT). Best effort: servers keep no state
    /// that matters for NFSv3 and a dead server must not block unmount.
    pub async fn unmount(&self, cred: &Credential) {
        let cfg = RpcConfig {
            timeo: Duration::from_secs(2),
            retrans: 1,
            hard: false,
            fail_fast_connect: true,
            connect_timeout: Duration::from_secs(2),
            ..self.nfs.rpc().config().clone()
        };
        let mountd = MountClient::new(RpcClient::new(
            SocketAddr::new(self.server.ip(), self.mountport),
            cfg,
        ));
        if let Err(e) = mountd.umnt(cred, self.export.as_bytes()).await {
            tracing::debug!(error = %e, "UMNT failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_sizes_are_clamped_to_server_and_fuse_limits() {
        assert_eq!(clamp_transfer(None, 64 << 20), 1 << 20);
        assert_eq!(clamp_transfer(None, 32768), 32768);
        assert_eq!(clamp_transfer(Some(65536), 1 << 20), 65536);
        assert_eq!(clamp_transfer(Some(100_000), 1 << 20), 98304);
        assert_eq!(clamp_transfer(Some(10), 1 << 20), 4096);
        assert_eq!(clamp_transfer(None, 0), 1 << 20);
    }
}
