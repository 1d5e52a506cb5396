//! CSI Node service: publishes a volume by running a `csi-nfs-fuse mount`
//! child on the target path (no staging: Swarm never calls NodeUnstage).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::controller::check_capability;
use super::errors;
use super::limits::Limits;
use super::params::{self, check_mount_options, context_get};
use super::proto::node_server::Node;
use super::proto::node_service_capability::{self, rpc};
use super::proto::volume_capability::{AccessType, access_mode::Mode};
use super::proto::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, VolumeCapability, VolumeUsage,
    volume_usage,
};
use super::supervisor::{MountSpec, Supervisor};
use super::volume_id::VolumeRef;

pub struct NodeService {
    pub node_id: String,
    pub supervisor: Arc<Supervisor>,
}

fn absolute(field: &str, p: &str) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(errors::missing(field));
    }
    if !p.starts_with('/') {
        return Err(errors::invalid(format!(
            "{field} '{p}' must be an absolute path"
        )));
    }
    if p.contains('\0') {
        return Err(errors::invalid(format!(
            "{field} '{}' contains a NUL byte",
            p.escape_debug()
        )));
    }
    // The SP creates and later removes this directory: never somewhere a
    // `..` leads to.
    if p.split('/').any(|c| c == "..") {
        return Err(errors::invalid(format!(
            "{field} '{p}' must not contain '..'"
        )));
    }
    Ok(PathBuf::from(p))
}

/// The `-o` list for a publish: the plugin's default options, the volume's
/// mountOptions, the capability's
/// mount flags, allow_other (containers run as any user), ro if asked, and
/// the ports recorded in the volume id.
pub fn mount_options(
    v: &VolumeRef,
    context: &HashMap<String, String>,
    cap: &VolumeCapability,
    readonly: bool,
) -> Result<String, Status> {
    let mut parts: Vec<String> = Vec::new();
    // The plugin-wide defaults (`docker plugin set
    // CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS=...`) come first, so a volume's own
    // mountOptions override them (later options win).
    if let Ok(o) = std::env::var("CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS")
        && !o.trim().is_empty()
    {
        check_mount_options("CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS", &o)?;
        parts.push(o.trim().to_string());
    }
    if let Some(o) = context_get(context, params::MOUNT_OPTIONS) {
        check_mount_options(params::MOUNT_OPTIONS, o)?;
        if !o.trim().is_empty() {
            parts.push(o.trim().to_string());
        }
    }
    if let Some(AccessType::Mount(m)) = &cap.access_type {
        for f in &m.mount_flags {
            if !f.trim().is_empty() {
                parts.push(f.trim().to_string());
            }
        }
    }
    let so_far = check_mount_options("mount options", &parts.join(","))?;
    if so_far.port.is_none()
        && let Some(p) = v.port
    {
        parts.push(format!("port={p}"));
    }
    if so_far.mountport.is_none()
        && let Some(p) = v.mountport
    {
        parts.push(format!("mountport={p}"));
    }
    parts.push("allow_other".into());
    let reader_only = matches!(
        cap.access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok()),
        Some(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    );
    if readonly || reader_only {
        parts.push("ro".into());
    }
    let list = parts.join(",");
    check_mount_options("mount options", &list)?;
    Ok(list)
}

/// The volume_context, if it names the volume, must agree with the id.
fn check_context(v: &VolumeRef, context: &HashMap<String, String>) -> Result<(), Status> {
    for (key, want) in [
        (params::SERVER, v.server.as_str()),
        (params::SHARE, v.share.as_str()),
        (params::SUB_DIR, v.sub_dir.as_str()),
    ] {
        if let Some(got) = context_get(context, key)
            && got != want
        {
            return Err(errors::invalid(format!(
                "volume_context {key}='{got}' does not match the volume id ('{want}')"
            )));
        }
    }
    Ok(())
}

/// Creates the target directory (and its parents; Swarm creates neither).
/// An existing target, even a dead mount point, is fine.
fn make_target(target: &Path) -> Result<(), Status> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| errors::from_io(&format!("creating {}", parent.display()), &e))?;
    }
    match std::fs::create_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(errors::from_io(
            &format!("creating target {}", target.display()),
            &e,
        )),
    }
}

/// Removes the target the SP created (never its contents: if something is
/// still mounted or left there, fail rather than delete data).
fn remove_target(target: &Path) -> Result<(), Status> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(md) if !md.is_dir() => std::fs::remove_file(target)
            .map_err(|e| errors::from_io(&format!("removing {}", target.display()), &e)),
        _ => match std::fs::remove_dir(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(errors::from_io(
                &format!("removing target {}", target.display()),
                &e,
            )),
        },
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        if req.volume_id.is_empty() {
            return Err(errors::missing("volume_id"));
        }
        let target = absolute("target_path", &req.target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| errors::missing("volume_capability"))?;
        check_capability(cap)?;
        let v = VolumeRef::decode(&req.volume_id)
            .map_err(|e| errors::not_found(format!("volume {}: {e}", req.volume_id)))?;
        check_context(&v, &req.volume_context)?;
        let options = mount_options(&v, &req.volume_context, cap, req.readonly)?;
        let spec = MountSpec {
            volume_id: req.volume_id.clone(),
            source: v.source_url(),
            options,
        };
        info!(
            volume_id = %req.volume_id, target = %target.display(), readonly = req.readonly,
            "NodePublishVolume"
        );
        make_target(&target)?;
        self.supervisor
            .publish(&target, spec)
            .await
            .inspect_err(|e| {
                warn!(volume_id = %req.volume_id, target = %target.display(), code = ?e.code(), error = %e.message(), "NodePublishVolume failed")
            })?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        if req.volume_id.is_empty() {
            return Err(errors::missing("volume_id"));
        }
        let target = absolute("target_path", &req.target_path)?;
        info!(volume_id = %req.volume_id, target = %target.display(), "NodeUnpublishVolume");
        self.supervisor.unpublish(&target).await?;
        remove_target(&target)?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        if req.volume_id.is_empty() {
            return Err(errors::missing("volume_id"));
        }
        if req.volume_path.is_empty() {
            return Err(errors::missing("volume_path"));
        }
        let path = PathBuf::from(&req.volume_path);
        if !self.supervisor.is_published(&path, &req.volume_id) {
            let exists = std::fs::symlink_metadata(&path).is_ok();
            return Err(errors::not_found(if exists {
                format!(
                    "{} is not a published path of volume {}",
                    req.volume_path, req.volume_id
                )
            } else {
                format!("volume path {} does not exist", req.volume_path)
            }));
        }
        if let Some(reason) = self.supervisor.down_reason(&path) {
            return Err(Status::unavailable(format!(
                "the mount of {} is down ({reason}); it is being restarted",
                req.volume_path
            )));
        }
        let p = path.clone();
        let stat = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&p));
        let st = match tokio::time::timeout(Duration::from_secs(5), stat).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "statfs of {} did not answer within 5 s; is the NFS server reachable?",
                    req.volume_path
                )));
            }
            Ok(Err(e)) => return Err(errors::internal(format!("statfs task: {e}"))),
            Ok(Ok(Err(e))) => {
                return Err(errors::from_io(
                    &format!("statfs of {}", req.volume_path),
                    &std::io::Error::from(e),
                ));
            }
            Ok(Ok(Ok(st))) => st,
        };
        let frsize = st.fragment_size() as u64;
        let clamp = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        let total = st.blocks() as u64 * frsize;
        let free = st.blocks_free() as u64 * frsize;
        let avail = st.blocks_available() as u64 * frsize;
        let files = st.files() as u64;
        let ffree = st.files_free() as u64;
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: vec![
                VolumeUsage {
                    available: clamp(avail),
                    total: clamp(total),
                    used: clamp(total.saturating_sub(free)),
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: clamp(st.files_available() as u64),
                    total: clamp(files),
                    used: clamp(files.saturating_sub(ffree)),
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ],
            volume_condition: None,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // No STAGE_UNSTAGE_VOLUME: Swarm never calls NodeUnstage (swarmkit
        // #3178), so the mount happens in NodePublish.
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![NodeServiceCapability {
                r#type: Some(node_service_capability::Type::Rpc(
                    node_service_capability::Rpc {
                        r#type: rpc::Type::GetVolumeStats as i32,
                    },
                )),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::proto::volume_capability::{AccessMode, MountVolume};
    use crate::csi::volume_id::OnDelete;

    fn cap(mode: Mode, flags: &[&str]) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
            })),
        }
    }

    fn vol(port: Option<u16>) -> VolumeRef {
        VolumeRef {
            server: "h".into(),
            share: "/e".into(),
            sub_dir: "s".into(),
            on_delete: OnDelete::Delete,
            port,
            mountport: port,
        }
    }

    #[test]
    fn options_combine() {
        let ctx: HashMap<String, String> =
            [("mountOptions".to_string(), "nconnect=2".to_string())].into();
        let o = mount_options(
            &vol(None),
            &ctx,
            &cap(Mode::MultiNodeMultiWriter, &["noac"]),
            false,
        )
        .unwrap();
        assert_eq!(o, "nconnect=2,noac,allow_other");
        let o = mount_options(
            &vol(Some(2050)),
            &HashMap::new(),
            &cap(Mode::MultiNodeReaderOnly, &[]),
            false,
        )
        .unwrap();
        assert_eq!(o, "port=2050,mountport=2050,allow_other,ro");
        let o = mount_options(
            &vol(None),
            &HashMap::new(),
            &cap(Mode::SingleNodeWriter, &[]),
            true,
        )
        .unwrap();
        assert_eq!(o, "allow_other,ro");
        let e = mount_options(
            &vol(None),
            &HashMap::new(),
            &cap(Mode::SingleNodeWriter, &["bogus"]),
            false,
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("bogus"));
    }
}
