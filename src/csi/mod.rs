//! `csi-nfs-fuse plugin`: a CSI v1.9.0 driver (Identity, Controller, Node)
//! for Docker Swarm on a unix socket.
//!
//! Shaped like kubernetes-csi/csi-driver-nfs, one file per service:
//! [`identity`], [`controller`] (volume directories over our NFS client),
//! [`node`] (one `csi-nfs-fuse mount` child per target, run by the
//! [`supervisor`]); [`volume_id`] is the one ID codec, [`params`] parses
//! CreateVolume parameters, [`limits`] checks the spec's size limits and
//! [`errors`] maps failures to gRPC codes.

pub mod controller;
pub mod errors;
pub mod identity;
pub mod limits;
pub mod node;
pub mod params;
pub mod supervisor;
pub mod volume_id;

/// Code generated from proto/csi.proto (CSI spec v1.9.0).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("csi.v1");
}

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::info;

use proto::controller_server::ControllerServer;
use proto::identity_server::IdentityServer;
use proto::node_server::NodeServer;

/// Where Docker's managed-plugin config mounts the host's /etc/hostname.
pub const NODE_HOSTNAME_FILE: &str = "/node_hostname";
/// CSI caps node_id at 256 bytes.
const MAX_NODE_ID: usize = limits::MAX_NODE_ID;

#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// `unix:///path/to/csi.sock` or a bare path.
    pub endpoint: String,
    pub node_id: Option<String>,
    /// The FUSE device Probe checks.
    pub fuse_device: PathBuf,
    /// Mode of the socket file (0600 or 0660).
    pub socket_mode: u32,
}

/// Keys with an operation in progress; a second caller gets ABORTED, as the
/// spec asks for concurrent calls on the same volume.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

pub struct InFlightGuard {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn try_lock(&self, key: &str) -> Option<InFlightGuard> {
        if self.0.lock().insert(key.to_string()) {
            Some(InFlightGuard {
                set: self.0.clone(),
                key: key.to_string(),
            })
        } else {
            None
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// The socket path of a CSI endpoint: `unix:///abs/path`, `unix:/abs/path`
/// or a bare path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let e = endpoint.trim();
    let path = if let Some(rest) = e.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            bail!("endpoint '{endpoint}': expected unix:///absolute/path");
        }
        rest
    } else if let Some(rest) = e.strip_prefix("unix:") {
        rest
    } else if e.contains("://") {
        bail!("endpoint '{endpoint}': only unix sockets are supported (unix:///path or a path)");
    } else {
        e
    };
    if path.is_empty() {
        bail!("endpoint is empty: pass --endpoint or set CSI_ENDPOINT");
    }
    Ok(PathBuf::from(path))
}

/// `--node-id`, else the host's name from /node_hostname, else our hostname.
pub fn resolve_node_id(given: Option<&str>, hostname_file: &Path) -> anyhow::Result<String> {
    let id = match given.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => id.to_string(),
        None => match std::fs::read_to_string(hostname_file) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => nix::unistd::gethostname()
                .context("reading the hostname")?
                .to_string_lossy()
                .into_owned(),
        },
    };
    if id.is_empty() || id.len() > MAX_NODE_ID {
        bail!("node id '{id}' must be 1 to {MAX_NODE_ID} bytes");
    }
    Ok(id)
}

/// Binds the socket: removes a stale socket file, refuses to steal one a
/// live server is answering on, and sets the mode.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a running server (another plugin instance?)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
        info!(socket = %path.display(), "removed stale socket");
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok(listener)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down: finishing calls in flight");
}

/// `CSI_NFS_FUSE_KEEP_MOUNTS=1`: on SIGTERM/SIGINT leave the mount
/// processes running (for a restart or an upgrade of the plugin outside a
/// container, where they outlive it; a Docker managed plugin's container
/// takes them down with it whatever we do).
pub const KEEP_MOUNTS_ENV: &str = "CSI_NFS_FUSE_KEEP_MOUNTS";

fn keep_mounts_on_exit() -> bool {
    std::env::var(KEEP_MOUNTS_ENV)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// Runs the plugin until SIGTERM or SIGINT.
pub async fn serve(cfg: PluginConfig) -> anyhow::Result<()> {
    let path = socket_path(&cfg.endpoint)?;
    let node_id = resolve_node_id(cfg.node_id.as_deref(), Path::new(NODE_HOSTNAME_FILE))?;
    let exe = std::env::current_exe().context("locating our own executable")?;
    let listener = bind(&path, cfg.socket_mode)?;
    let supervisor = supervisor::Supervisor::start(exe);
    // Refused again at every NodePublish (INVALID_ARGUMENT naming it); said
    // at start too, where `docker plugin enable` shows it to the operator.
    if let Ok(o) = std::env::var("CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS")
        && let Err(e) = params::check_mount_options("CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS", &o)
    {
        tracing::error!(
            error = %e.message(),
            "invalid plugin setting: every NodePublish will be refused until it is fixed"
        );
    }
    info!(
        socket = %path.display(), node_id = %node_id, driver = identity::DRIVER_NAME,
        version = identity::DRIVER_VERSION, "CSI plugin listening"
    );
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::IdentityService {
            fuse_device: cfg.fuse_device.clone(),
        }))
        .add_service(ControllerServer::new(controller::ControllerService::new()))
        .add_service(NodeServer::new(node::NodeService {
            node_id,
            supervisor: supervisor.clone(),
        }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    if keep_mounts_on_exit() {
        let kept = supervisor.release_all();
        info!(
            mounts = kept,
            "{KEEP_MOUNTS_ENV} is set: leaving the mounts running for the next plugin to adopt"
        );
    } else {
        // Published volumes go with us; stop their mounts cleanly (flushing
        // written data) rather than leaving them to die with the container.
        supervisor.shutdown().await;
    }
    let _ = std::fs::remove_file(&path);
    info!("CSI plugin stopped");
    result.context("gRPC server")
}

/// Runs the plugin on its own runtime (for `main`).
pub fn run(cfg: PluginConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("csi")
        .build()?;
    rt.block_on(serve(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/docker/plugins/csi.sock").unwrap(),
            PathBuf::from("/run/docker/plugins/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("unix://relative").is_err());
        assert!(socket_path("").is_err());
    }

    #[test]
    fn node_id_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node_hostname");
        assert_eq!(resolve_node_id(Some("n1"), &f).unwrap(), "n1");
        std::fs::write(&f, "swarm-node-7\n").unwrap();
        assert_eq!(resolve_node_id(None, &f).unwrap(), "swarm-node-7");
        std::fs::remove_file(&f).unwrap();
        let host = nix::unistd::gethostname().unwrap();
        assert_eq!(
            resolve_node_id(None, &f).unwrap(),
            host.to_string_lossy().as_ref()
        );
        assert!(resolve_node_id(Some(&"x".repeat(300)), &f).is_err());
    }

    #[test]
    fn in_flight_excludes() {
        let f = InFlight::default();
        let g = f.try_lock("a").unwrap();
        assert!(f.try_lock("a").is_none());
        assert!(f.try_lock("b").is_some());
        drop(g);
        assert!(f.try_lock("a").is_some());
    }
}
