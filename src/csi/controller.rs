//! CSI Controller service: volume directories on the NFS server, managed
//! through our own NFS client (no mount needed on managers).
//!
//! CreateVolume walks/creates `<share>/<subDir>` with LOOKUP and MKDIR.
//! DeleteVolume removes, archives or keeps it. Everything works on file
//! handles from LOOKUP and READDIRPLUS, and NFSv3 LOOKUP never follows
//! symlinks, so a symlink planted inside a volume is removed as an entry and
//! never traversed: nothing outside `<share>/<subDir>` is touched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use nfs3_types::nfs3::nfsstat3;
use parking_lot::Mutex;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use super::InFlight;
use super::errors;
use super::limits::Limits;
use super::params::{VolumeParams, check_mount_options};
use super::proto::controller_server::Controller;
use super::proto::controller_service_capability::{self, rpc};
use super::proto::validate_volume_capabilities_response::Confirmed;
use super::proto::volume_capability::{AccessType, access_mode::Mode};
use super::proto::{
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerServiceCapability, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeRequest,
    DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse, Volume,
    VolumeCapability,
};
use super::volume_id::{OnDelete, VolumeRef};
use crate::nfs::client::{readdirplus_all, sattr_mode};
use crate::nfs::{ConnectConfig, Fattr, FileHandle, FileType, NfsError, NfsSession, session};
use crate::options::MountOptions;
use crate::rpc::{AuthSys, Credential};

/// Mode of directories CreateVolume makes (like `mkdir -p` under umask 022);
/// `mountPermissions` overrides it for the volume directory.
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Deepest directory nesting DeleteVolume descends into.
const MAX_DEPTH: usize = 512;
const READDIR_MAX: u32 = 64 << 10;

/// Checks the capabilities of CreateVolume and ValidateVolumeCapabilities:
/// present, mount (not block) access, and a known access mode.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(errors::missing("volume_capabilities"));
    }
    for cap in caps {
        check_capability(cap)?;
    }
    Ok(())
}

pub fn check_capability(cap: &VolumeCapability) -> Result<(), Status> {
    match &cap.access_type {
        None => {
            return Err(errors::invalid(
                "volume_capability.access_type is required (mount)",
            ));
        }
        Some(AccessType::Block(_)) => {
            return Err(errors::invalid(
                "block access is not supported: NFS volumes are filesystems; use --type mount",
            ));
        }
        Some(AccessType::Mount(m)) => {
            for flags in &m.mount_flags {
                check_mount_options("volume_capability.mount.mount_flags", flags)?;
            }
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| errors::missing("volume_capability.access_mode"))?;
    match Mode::try_from(mode.mode) {
        Ok(Mode::Unknown) | Err(_) => Err(errors::invalid(format!(
            "access mode {} is unknown or unsupported (with Swarm: --scope multi needs --sharing readonly, onewriter or all)",
            mode.mode
        ))),
        Ok(_) => Ok(()),
    }
}

/// The controller's NFS identity: root, so it can create and delete any
/// volume directory the export lets root touch (also the supervisor's
/// probe of a dead mount's server).
pub(super) fn root_cred() -> Credential {
    let me = AuthSys::current_process();
    Credential::Sys(AuthSys::new(0, 0, vec![], me.machine_name))
}

/// Short soft timeouts: an unreachable server must fail the call within a
/// few seconds (Swarm gives each volume call 15 s), never hang it. Also
/// the supervisor's probe of a dead mount's server.
pub(super) fn quick_config(opts: &MountOptions) -> ConnectConfig {
    let mut cfg = opts.connect_config();
    cfg.rpc.hard = false;
    cfg.rpc.timeo = opts.timeo.min(Duration::from_secs(4));
    cfg.rpc.retrans = 1;
    cfg.rpc.nconnect = 1;
    cfg.rpc.fail_fast_connect = true;
    cfg.rpc.connect_timeout = Duration::from_secs(3);
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg
}

/// [`quick_config`] with the ports the volume id records.
fn controller_config(opts: &MountOptions, v: &VolumeRef) -> ConnectConfig {
    let mut cfg = quick_config(opts);
    cfg.port = v.port.or(cfg.port);
    cfg.mountport = v.mountport.or(cfg.mountport);
    cfg
}

/// An NFS session on the volume's share, for the controller's calls.
struct Share {
    sess: NfsSession,
    cred: Credential,
}

impl Share {
    async fn connect(v: &VolumeRef, opts: &MountOptions) -> Result<Share, Status> {
        let cred = root_cred();
        let sess = session::connect(&v.server, &v.share, &controller_config(opts, v), &cred)
            .await
            .map_err(|e| errors::from_connect(&e))?;
        Ok(Share { sess, cred })
    }

    /// Tells mountd we are done, in the background (best effort).
    fn close(self) {
        tokio::spawn(async move { self.sess.unmount(&self.cred).await });
    }

    fn place(&self, name: &[u8]) -> String {
        format!(
            "{}:{} entry '{}'",
            self.sess.host,
            self.sess.export,
            String::from_utf8_lossy(name)
        )
    }

    /// LOOKUP without following symlinks; `None` if the name does not exist.
    async fn lookup(
        &self,
        dir: &FileHandle,
        name: &[u8],
    ) -> Result<Option<(FileHandle, Fattr)>, Status> {
        match self.sess.nfs.lookup(&self.cred, dir, name).await {
            Ok(ok) => {
                let attr = match ok.attr {
                    Some(a) => a,
                    None => {
                        self.sess
                            .nfs
                            .getattr(&self.cred, &ok.fh)
                            .await
                            .map_err(|f| {
                                errors::from_nfs(
                                    &format!("GETATTR of {}", self.place(name)),
                                    &f.into(),
                                )
                            })?
                            .attr
                    }
                };
                Ok(Some((ok.fh, attr)))
            }
            Err(f) if f.status() == Some(nfsstat3::NFS3ERR_NOENT) => Ok(None),
            Err(f) => Err(errors::from_nfs(
                &format!("LOOKUP of {}", self.place(name)),
                &f.into(),
            )),
        }
    }

    /// Walks `components` from the export root, creating missing directories.
    async fn ensure_dirs(&self, components: &[&str], leaf_mode: u32) -> Result<FileHandle, Status> {
        let mut dir = self.sess.root.clone();
        let mut path = String::new();
        for (i, c) in components.iter().enumerate() {
            path = if path.is_empty() {
                c.to_string()
            } else {
                format!("{path}/{c}")
            };
            let mode = if i + 1 == components.len() {
                leaf_mode
            } else {
                DEFAULT_DIR_MODE
            };
            let mut existing = self.lookup(&dir, c.as_bytes()).await?;
            if existing.is_none() {
                match self
                    .sess
                    .nfs
                    .mkdir(&self.cred, &dir, c.as_bytes(), sattr_mode(mode))
                    .await
                {
                    Ok(created) => {
                        info!(server = %self.sess.host, share = %self.sess.export, dir = %path, "created directory");
                        if let Some(fh) = created.fh {
                            dir = fh;
                            continue;
                        }
                    }
                    // Created concurrently: check what is there now.
                    Err(f) if f.status() == Some(nfsstat3::NFS3ERR_EXIST) => {}
                    Err(f) => {
                        return Err(errors::from_nfs(
                            &format!("MKDIR of {}", self.place(path.as_bytes())),
                            &f.into(),
                        ));
                    }
                }
                existing = self.lookup(&dir, c.as_bytes()).await?;
            }
            match existing {
                Some((fh, attr)) if attr.ftype == FileType::Directory => dir = fh,
                Some((_, attr)) => {
                    return Err(Status::failed_precondition(format!(
                        "{} exists and is not a directory ({:?})",
                        self.place(path.as_bytes()),
                        attr.ftype
                    )));
                }
                None => {
                    return Err(Status::unavailable(format!(
                        "{} vanished while being created",
                        self.place(path.as_bytes())
                    )));
                }
            }
        }
        Ok(dir)
    }

    /// Walks to the parent of the volume directory without creating anything.
    /// `None` if some component is missing (the volume is already gone).
    async fn find_parent(&self, components: &[&str]) -> Result<Option<FileHandle>, Status> {
        let mut dir = self.sess.root.clone();
        for c in &components[..components.len() - 1] {
            match self.lookup(&dir, c.as_bytes()).await? {
                Some((fh, attr)) if attr.ftype == FileType::Directory => dir = fh,
                _ => return Ok(None),
            }
        }
        Ok(Some(dir))
    }

    async fn remove_entry(
        &self,
        dir: &FileHandle,
        name: &[u8],
        is_dir: bool,
    ) -> Result<(), Status> {
        let r = if is_dir {
            self.sess.nfs.rmdir(&self.cred, dir, name).await
        } else {
            self.sess.nfs.remove(&self.cred, dir, name).await
        };
        match r {
            Ok(_) => Ok(()),
            Err(f) if f.status() == Some(nfsstat3::NFS3ERR_NOENT) => Ok(()),
            Err(f) if f.status() == Some(nfsstat3::NFS3ERR_NOTEMPTY) => {
                Err(Status::failed_precondition(format!(
                    "{} is not empty after deleting its contents: is the volume still in use?",
                    self.place(name)
                )))
            }
            Err(f) => Err(errors::from_nfs(
                &format!(
                    "{} of {}",
                    if is_dir { "RMDIR" } else { "REMOVE" },
                    self.place(name)
                ),
                &f.into(),
            )),
        }
    }

    /// Empties directory `dir` (whose attributes are `attr`) recursively.
    /// Symlinks, files and other non-directories are unlinked by name;
    /// only directories are descended into, by handle, and never across a
    /// filesystem boundary or into an ancestor.
    fn empty_dir<'a>(
        &'a self,
        dir: FileHandle,
        attr: Fattr,
        ancestors: &'a mut Vec<u64>,
    ) -> BoxFuture<'a, Result<(), Status>> {
        Box::pin(async move {
            if ancestors.len() > MAX_DEPTH {
                return Err(Status::failed_precondition(format!(
                    "directory tree deeper than {MAX_DEPTH} levels; not deleting"
                )));
            }
            ancestors.push(attr.fileid);
            // A second listing catches entries created while we deleted.
            for _round in 0..3 {
                let entries = readdirplus_all(&self.sess.nfs, &self.cred, &dir, READDIR_MAX)
                    .await
                    .map_err(|e| errors::from_nfs("READDIRPLUS while deleting a volume", &e))?;
                let mut removed_any = false;
                for e in entries {
                    let name = &e.name[..];
                    if name == b"." || name == b".." || name.is_empty() || name.contains(&b'/') {
                        continue;
                    }
                    removed_any = true;
                    let (fh, child) = match (e.fh, e.attr) {
                        (Some(fh), Some(a)) => (fh, a),
                        _ => match self.lookup(&dir, name).await? {
                            Some(x) => x,
                            None => continue,
                        },
                    };
                    let is_dir = child.ftype == FileType::Directory;
                    if is_dir {
                        if child.fsid != attr.fsid {
                            return Err(Status::failed_precondition(format!(
                                "{} is another filesystem mounted inside the volume; not deleting",
                                self.place(name)
                            )));
                        }
                        if ancestors.contains(&child.fileid) {
                            return Err(Status::internal(format!(
                                "{} loops back to an ancestor directory; not deleting",
                                self.place(name)
                            )));
                        }
                        self.empty_dir(fh, child, ancestors).await?;
                    }
                    self.remove_entry(&dir, name, is_dir).await?;
                }
                if !removed_any {
                    break;
                }
            }
            ancestors.pop();
            Ok(())
        })
    }
}

/// What CreateVolume answered for a name, for idempotent repeats.
struct Created {
    params: VolumeParams,
    capacity: (i64, i64),
    volume: Volume,
}

pub struct ControllerService {
    created: Mutex<HashMap<String, Arc<Created>>>,
    in_flight: InFlight,
}

impl Default for ControllerService {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerService {
    pub fn new() -> Self {
        Self {
            created: Mutex::new(HashMap::new()),
            in_flight: InFlight::default(),
        }
    }

    async fn create_dir(&self, p: &VolumeParams) -> Result<(), Status> {
        let share = Share::connect(&p.volume, &p.options()).await?;
        let comps = p.volume.components();
        let result = async {
            let leaf_mode = p.mount_permissions.unwrap_or(DEFAULT_DIR_MODE);
            let fh = share.ensure_dirs(&comps, leaf_mode).await?;
            if let Some(mode) = p.mount_permissions {
                // The server may have applied a umask to MKDIR's mode; set it
                // exactly (also when the directory already existed).
                share
                    .sess
                    .nfs
                    .setattr(&share.cred, &fh, sattr_mode(mode), None)
                    .await
                    .map_err(|f| {
                        errors::from_nfs(
                            &format!("SETATTR mode {mode:o} of {}", p.volume.sub_dir),
                            &NfsError::from(f),
                        )
                    })?;
            }
            Ok(())
        }
        .await;
        share.close();
        result
    }

    async fn delete_dir(&self, v: &VolumeRef) -> Result<(), Status> {
        let share = Share::connect(v, &MountOptions::default()).await?;
        let result = self.delete_in(&share, v).await;
        share.close();
        result
    }

    async fn delete_in(&self, share: &Share, v: &VolumeRef) -> Result<(), Status> {
        let comps = v.components();
        let leaf = comps[comps.len() - 1];
        let Some(parent) = share.find_parent(&comps).await? else {
            info!(server = %v.server, share = %v.share, sub_dir = %v.sub_dir, "volume directory already gone");
            return Ok(());
        };
        let Some((fh, attr)) = share.lookup(&parent, leaf.as_bytes()).await? else {
            info!(server = %v.server, share = %v.share, sub_dir = %v.sub_dir, "volume directory already gone");
            return Ok(());
        };
        match v.on_delete {
            OnDelete::Retain => Ok(()),
            OnDelete::Archive => {
                let mut to = format!("archived-{leaf}");
                if share.lookup(&parent, to.as_bytes()).await?.is_some() {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    to = format!("archived-{leaf}-{now}");
                }
                if to.len() > super::volume_id::MAX_COMPONENT {
                    return Err(Status::failed_precondition(format!(
                        "archive name '{to}' would exceed 255 bytes"
                    )));
                }
                share
                    .sess
                    .nfs
                    .rename(
                        &share.cred,
                        &parent,
                        leaf.as_bytes(),
                        &parent,
                        to.as_bytes(),
                    )
                    .await
                    .map_err(|f| {
                        errors::from_nfs(
                            &format!("RENAME of {} to {to}", v.sub_dir),
                            &NfsError::from(f),
                        )
                    })?;
                info!(server = %v.server, share = %v.share, sub_dir = %v.sub_dir, archived_as = %to, "volume archived");
                Ok(())
            }
            OnDelete::Delete => {
                let is_dir = attr.ftype == FileType::Directory;
                if is_dir {
                    let mut ancestors = vec![share.sess.root_attr.fileid];
                    share.empty_dir(fh, attr, &mut ancestors).await?;
                }
                share.remove_entry(&parent, leaf.as_bytes(), is_dir).await?;
                info!(server = %v.server, share = %v.share, sub_dir = %v.sub_dir, "volume deleted");
                Ok(())
            }
        }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        if req.name.is_empty() {
            return Err(errors::missing("name"));
        }
        check_capabilities(&req.volume_capabilities)?;
        let capacity = match req.capacity_range {
            None => (0, 0),
            Some(r) => {
                if r.required_bytes < 0 || r.limit_bytes < 0 {
                    return Err(errors::invalid(
                        "capacity_range values must not be negative",
                    ));
                }
                if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
                    return Err(Status::out_of_range(format!(
                        "capacity_range: required_bytes {} exceeds limit_bytes {}",
                        r.required_bytes, r.limit_bytes
                    )));
                }
                (r.required_bytes, r.limit_bytes)
            }
        };
        if req.volume_content_source.is_some() {
            return Err(errors::invalid(
                "volume_content_source is not supported (no snapshots or clones)",
            ));
        }
        if !req.mutable_parameters.is_empty() {
            return Err(errors::invalid("mutable_parameters are not supported"));
        }
        let params = VolumeParams::parse(&req.parameters, &req.name)?;
        let volume_id = params.volume.encode().map_err(|e| errors::from_id(&e))?;

        let _guard = self
            .in_flight
            .try_lock(&format!("create:{}", req.name))
            .ok_or_else(|| errors::aborted(&format!("volume '{}'", req.name)))?;
        if let Some(prev) = self.created.lock().get(&req.name).cloned() {
            if prev.params == params && prev.capacity == capacity {
                return Ok(Response::new(CreateVolumeResponse {
                    volume: Some(prev.volume.clone()),
                }));
            }
            return Err(Status::already_exists(format!(
                "volume '{}' already exists with different parameters or capacity (volume id {})",
                req.name, prev.volume.volume_id
            )));
        }

        info!(
            name = %req.name, server = %params.volume.server, share = %params.volume.share,
            sub_dir = %params.volume.sub_dir, on_delete = %params.volume.on_delete, "CreateVolume"
        );
        self.create_dir(&params).await.inspect_err(|e| {
            warn!(name = %req.name, code = ?e.code(), error = %e.message(), "CreateVolume failed")
        })?;
        let volume = Volume {
            capacity_bytes: 0,
            volume_id,
            volume_context: params.volume_context(),
            content_source: None,
            accessible_topology: vec![],
        };
        self.created.lock().insert(
            req.name.clone(),
            Arc::new(Created {
                params,
                capacity,
                volume: volume.clone(),
            }),
        );
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        if req.volume_id.is_empty() {
            return Err(errors::missing("volume_id"));
        }
        let v = match VolumeRef::decode(&req.volume_id) {
            Ok(v) => v,
            Err(e) => {
                // Not ours (or forged): there is nothing we could delete.
                info!(volume_id = %req.volume_id, reason = %e, "DeleteVolume of an unknown volume id: nothing to do");
                return Ok(Response::new(DeleteVolumeResponse {}));
            }
        };
        let _guard = self
            .in_flight
            .try_lock(&format!("volume:{}", req.volume_id))
            .ok_or_else(|| errors::aborted(&format!("volume {}", req.volume_id)))?;
        info!(volume_id = %req.volume_id, on_delete = %v.on_delete, "DeleteVolume");
        if v.on_delete != OnDelete::Retain {
            self.delete_dir(&v).await.inspect_err(|e| {
                warn!(volume_id = %req.volume_id, code = ?e.code(), error = %e.message(), "DeleteVolume failed")
            })?;
        }
        self.created
            .lock()
            .retain(|_, c| c.volume.volume_id != req.volume_id);
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        if req.volume_id.is_empty() {
            return Err(errors::missing("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(errors::missing("volume_capabilities"));
        }
        let v = VolumeRef::decode(&req.volume_id)
            .map_err(|e| errors::not_found(format!("volume {}: {e}", req.volume_id)))?;
        // The volume must exist on the server.
        let share = Share::connect(&v, &MountOptions::default()).await?;
        let found = async {
            let comps = v.components();
            let Some(parent) = share.find_parent(&comps).await? else {
                return Ok(false);
            };
            Ok::<_, Status>(matches!(
                share.lookup(&parent, comps[comps.len() - 1].as_bytes()).await?,
                Some((_, a)) if a.ftype == FileType::Directory
            ))
        }
        .await;
        share.close();
        if !found? {
            return Err(errors::not_found(format!(
                "volume {}: directory {}:{} does not exist",
                req.volume_id,
                v.server,
                v.full_path()
            )));
        }
        let resp = match check_capabilities(&req.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
            Err(e) if e.code() == Code::InvalidArgument => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            },
            Err(e) => return Err(e),
        };
        Ok(Response::new(resp))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        req.check_limits()?;
        for cap in &req.volume_capabilities {
            if check_capability(cap).is_err() {
                return Ok(Response::new(GetCapacityResponse::default()));
            }
        }
        let params = VolumeParams::parse(&req.parameters, "capacity")?;
        let share = Share::connect(&params.volume, &params.options()).await?;
        let stat = share
            .sess
            .nfs
            .fsstat(&share.cred, &share.sess.root)
            .await
            .map_err(|f| errors::from_nfs("FSSTAT", &f.into()));
        share.close();
        let stat = stat?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: i64::try_from(stat.abytes).unwrap_or(i64::MAX),
            maximum_volume_size: None,
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        // Not PUBLISH_UNPUBLISH_VOLUME: Swarm's plugin name/tag mismatch
        // (swarmkit #3215) breaks ControllerPublish, and NFS needs none.
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: vec![ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc {
                        r#type: rpc::Type::CreateDeleteVolume as i32,
                    },
                )),
            }],
        }))
    }
}
