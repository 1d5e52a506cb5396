//! Shared test helpers: an in-process nfs3_server and the ganesha harness.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use csi_nfs_fuse::nfs::{ConnectConfig, NfsSession};
use csi_nfs_fuse::rpc::{AuthSys, Credential, RpcConfig};
use nfs3_server::memfs::{MemFs, MemFsConfig};
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};

pub fn root_cred() -> Credential {
    Credential::Sys(AuthSys::new(0, 0, vec![], "csi-nfs-fuse-test".into()))
}

/// Starts nfs3_server's in-memory filesystem on 127.0.0.1 and returns its port.
/// It serves portmap, MOUNT and NFS on that one port, answering out of order.
pub async fn start_memfs(config: MemFsConfig) -> u16 {
    let fs = MemFs::new(config).expect("memfs");
    let listener = NFSTcpListener::bind("127.0.0.1:0", fs).await.expect("bind memfs");
    let port = listener.get_listen_port();
    tokio::spawn(async move {
        let _ = listener.handle_forever().await;
    });
    port
}

pub fn memfs_config(port: u16, rpc: RpcConfig) -> ConnectConfig {
    ConnectConfig {
        rpc,
        port: Some(port),
        mountport: Some(port),
        handshake_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

pub async fn mount_memfs(port: u16, rpc: RpcConfig) -> NfsSession {
    csi_nfs_fuse::nfs::session::connect("127.0.0.1", "/", &memfs_config(port, rpc), &root_cred())
        .await
        .expect("mount memfs")
}

/// The ganesha export started by `scripts/ganesha.sh` (via scripts/test.sh).
pub struct Ganesha {
    pub host: String,
    /// Path clients mount.
    pub export: String,
    /// The exported directory on this machine.
    pub dir: PathBuf,
}

/// Returns the ganesha export, or `None` (printing SKIP) when it is not
/// running. Under scripts/test.sh (CSI_NFS_FUSE_REQUIRE_GANESHA=1) a missing
/// server is a failure, so CI cannot pass by skipping.
pub fn ganesha() -> Option<Ganesha> {
    match (
        std::env::var("CSI_NFS_FUSE_GANESHA_EXPORT"),
        std::env::var("CSI_NFS_FUSE_GANESHA_DIR"),
    ) {
        (Ok(export), Ok(dir)) => Some(Ganesha {
            host: std::env::var("CSI_NFS_FUSE_GANESHA_HOST").unwrap_or_else(|_| "127.0.0.1".into()),
            export,
            dir: dir.into(),
        }),
        _ => {
            if std::env::var("CSI_NFS_FUSE_REQUIRE_GANESHA").as_deref() == Ok("1") {
                panic!("ganesha is required (CSI_NFS_FUSE_REQUIRE_GANESHA=1) but CSI_NFS_FUSE_GANESHA_EXPORT/DIR are not set");
            }
            eprintln!("SKIP: ganesha not running; run scripts/test.sh for the real-server tests");
            None
        }
    }
}

impl Ganesha {
    /// A fresh directory inside the export for one test, so tests can run
    /// side by side. Returns (path on disk, path relative to the export root).
    pub fn test_dir(&self, name: &str) -> (PathBuf, String) {
        let rel = format!("t-{name}-{}", std::process::id());
        let p = self.dir.join(&rel);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        // ganesha exports with root squash off; make it writable for any uid anyway.
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        (p, rel)
    }

    pub async fn mount(&self, rpc: RpcConfig) -> NfsSession {
        let cfg = ConnectConfig {
            rpc,
            handshake_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        csi_nfs_fuse::nfs::session::connect(&self.host, &self.export, &cfg, &root_cred())
            .await
            .expect("mount ganesha export")
    }
}
