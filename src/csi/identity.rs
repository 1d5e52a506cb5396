//! CSI Identity service: name, version, capabilities and health.

use std::path::PathBuf;

use tonic::{Request, Response, Status};
use tracing::warn;

use super::proto::identity_server::Identity;
use super::proto::plugin_capability::{self, service};
use super::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Domain-style driver name (≤ 63 characters, alphanumeric at both ends).
pub const DRIVER_NAME: &str = "csi-nfs-fuse.csi.io";
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct IdentityService {
    /// The FUSE device every mount needs (`/dev/fuse`).
    pub fuse_device: PathBuf,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: DRIVER_VERSION.into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // CONTROLLER_SERVICE only: no topology constraints, no expansion.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service {
                        r#type: service::Type::ControllerService as i32,
                    },
                )),
            }],
        }))
    }

    /// Ready when the FUSE device is there; that we answer at all shows the
    /// socket is healthy.
    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&self.fuse_device) {
            Ok(md) if md.file_type().is_char_device() => {
                Ok(Response::new(ProbeResponse { ready: Some(true) }))
            }
            Ok(_) => {
                let msg = format!(
                    "{} is not a character device; FUSE mounts are impossible",
                    self.fuse_device.display()
                );
                warn!("probe: {msg}");
                Err(Status::failed_precondition(msg))
            }
            Err(e) => {
                let msg = format!(
                    "{} is not usable ({e}); give the plugin the FUSE device (linux.devices /dev/fuse)",
                    self.fuse_device.display()
                );
                warn!("probe: {msg}");
                Err(Status::failed_precondition(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_domain_style() {
        assert!(DRIVER_NAME.len() <= 63);
        let b = DRIVER_NAME.as_bytes();
        assert!(b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric());
        assert!(
            DRIVER_NAME
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        );
    }
}
