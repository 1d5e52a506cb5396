//! The CSI size limits, checked in one place for every request we serve.
//!
//! CSI spec v1.9.0, "Size Limits": a string SHALL NOT exceed 128 bytes and a
//! `map<string, string>` 4 KiB, unless a field overrides it:
//! - `node_id` may be 256 bytes (we produce it; see `resolve_node_id`);
//! - paths (`target_path`, `staging_target_path`, `volume_path`) have no
//!   CSI limit ("the maximum path length allowed by the operating system"),
//!   so they are held to PATH_MAX (4096 bytes, NUL included);
//! - `mount_flags` is limited to 4 KiB in total rather than per string.
//!
//! `volume_id` has no override: 128 bytes. A map's size is the sum of its
//! keys' and values' bytes. Every handler calls [`Limits::check_limits`]
//! first, so an oversized field is INVALID_ARGUMENT before anything else
//! looks at it. Messages name the field and its size, never its content
//! (secrets, and mount flags, which "MAY contain sensitive information").

use std::collections::HashMap;

use tonic::Status;

use super::proto::volume_capability::AccessType;
use super::proto::volume_content_source::Type as SourceType;
use super::proto::{
    CreateVolumeRequest, DeleteVolumeRequest, GetCapacityRequest, NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, Topology,
    ValidateVolumeCapabilitiesRequest, VolumeCapability,
};

/// General limit for a string field.
pub const MAX_STRING: usize = 128;
/// General limit for a map field (keys plus values).
pub const MAX_MAP: usize = 4096;
/// `node_id` overrides the string limit.
pub const MAX_NODE_ID: usize = 256;
/// `mount_flags`, all strings together.
pub const MAX_MOUNT_FLAGS: usize = 4096;
/// Paths: PATH_MAX includes the terminating NUL.
pub const MAX_PATH: usize = libc::PATH_MAX as usize - 1;

fn too_big(field: &str, what: &str, len: usize, max: usize) -> Status {
    Status::invalid_argument(format!(
        "{field} is {len} bytes{what}; the CSI limit is {max} bytes"
    ))
}

/// A string field under the general 128-byte limit.
pub fn string(field: &str, v: &str) -> Result<(), Status> {
    if v.len() > MAX_STRING {
        return Err(too_big(field, "", v.len(), MAX_STRING));
    }
    Ok(())
}

/// A path field: no CSI limit beyond the OS's PATH_MAX.
pub fn path(field: &str, v: &str) -> Result<(), Status> {
    if v.len() > MAX_PATH {
        return Err(too_big(field, "", v.len(), MAX_PATH));
    }
    Ok(())
}

/// The size of a map as the limit counts it: keys plus values.
pub fn map_size(m: &HashMap<String, String>) -> usize {
    m.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// A map field under the 4 KiB limit.
pub fn map(field: &str, m: &HashMap<String, String>) -> Result<(), Status> {
    let len = map_size(m);
    if len > MAX_MAP {
        return Err(too_big(field, " (keys plus values)", len, MAX_MAP));
    }
    Ok(())
}

fn capability(field: &str, cap: &VolumeCapability) -> Result<(), Status> {
    if let Some(AccessType::Mount(m)) = &cap.access_type {
        string(&format!("{field}.mount.fs_type"), &m.fs_type)?;
        string(
            &format!("{field}.mount.volume_mount_group"),
            &m.volume_mount_group,
        )?;
        let total: usize = m.mount_flags.iter().map(String::len).sum();
        if total > MAX_MOUNT_FLAGS {
            return Err(too_big(
                &format!("{field}.mount.mount_flags"),
                " in total",
                total,
                MAX_MOUNT_FLAGS,
            ));
        }
    }
    Ok(())
}

fn capabilities(field: &str, caps: &[VolumeCapability]) -> Result<(), Status> {
    caps.iter().try_for_each(|c| capability(field, c))
}

fn topologies(field: &str, t: &[Topology]) -> Result<(), Status> {
    t.iter().try_for_each(|t| map(field, &t.segments))
}

/// A request whose fields are checked against the CSI size limits.
pub trait Limits {
    fn check_limits(&self) -> Result<(), Status>;
}

impl Limits for CreateVolumeRequest {
    fn check_limits(&self) -> Result<(), Status> {
        string("name", &self.name)?;
        capabilities("volume_capabilities", &self.volume_capabilities)?;
        map("parameters", &self.parameters)?;
        map("secrets", &self.secrets)?;
        map("mutable_parameters", &self.mutable_parameters)?;
        if let Some(src) = self
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            match src {
                SourceType::Snapshot(s) => {
                    string("volume_content_source.snapshot_id", &s.snapshot_id)?
                }
                SourceType::Volume(v) => string("volume_content_source.volume_id", &v.volume_id)?,
            }
        }
        if let Some(t) = &self.accessibility_requirements {
            topologies("accessibility_requirements.requisite", &t.requisite)?;
            topologies("accessibility_requirements.preferred", &t.preferred)?;
        }
        Ok(())
    }
}

impl Limits for DeleteVolumeRequest {
    fn check_limits(&self) -> Result<(), Status> {
        string("volume_id", &self.volume_id)?;
        map("secrets", &self.secrets)
    }
}

impl Limits for ValidateVolumeCapabilitiesRequest {
    fn check_limits(&self) -> Result<(), Status> {
        string("volume_id", &self.volume_id)?;
        map("volume_context", &self.volume_context)?;
        capabilities("volume_capabilities", &self.volume_capabilities)?;
        map("parameters", &self.parameters)?;
        map("secrets", &self.secrets)?;
        map("mutable_parameters", &self.mutable_parameters)
    }
}

impl Limits for GetCapacityRequest {
    fn check_limits(&self) -> Result<(), Status> {
        capabilities("volume_capabilities", &self.volume_capabilities)?;
        map("parameters", &self.parameters)?;
        if let Some(t) = &self.accessible_topology {
            map("accessible_topology", &t.segments)?;
        }
        Ok(())
    }
}

impl Limits for NodePublishVolumeRequest {
    fn check_limits(&self) -> Result<(), Status> {
        string("volume_id", &self.volume_id)?;
        map("publish_context", &self.publish_context)?;
        path("staging_target_path", &self.staging_target_path)?;
        path("target_path", &self.target_path)?;
        if let Some(c) = &self.volume_capability {
            capability("volume_capability", c)?;
        }
        map("secrets", &self.secrets)?;
        map("volume_context", &self.volume_context)
    }
}

impl Limits for NodeUnpublishVolumeRequest {
    fn check_limits(&self) -> Result<(), Status> {
        string("volume_id", &self.volume_id)?;
        path("target_path", &self.target_path)
    }
}

impl Limits for NodeGetVolumeStatsRequest {
    fn check_limits(&self) -> Result<(), Status> {
        string("volume_id", &self.volume_id)?;
        path("volume_path", &self.volume_path)?;
        path("staging_target_path", &self.staging_target_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::proto::volume_capability::MountVolume;
    use tonic::Code;

    fn kv(n: usize) -> HashMap<String, String> {
        [("k".to_string(), "v".repeat(n - 1))].into()
    }

    #[test]
    fn strings_maps_and_paths_at_and_over_the_limit() {
        assert!(string("name", &"x".repeat(128)).is_ok());
        let e = string("name", &"x".repeat(129)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("name is 129 bytes") && e.message().contains("128"));
        // Multi-byte characters count in bytes.
        assert!(string("name", &"é".repeat(65)).is_err());
        assert!(map("parameters", &kv(4096)).is_ok());
        let e = map("secrets", &kv(4097)).unwrap_err();
        assert!(
            e.message().contains("secrets is 4097 bytes"),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("vvvv"), "no content in the message");
        assert!(path("target_path", &format!("/{}", "p".repeat(4094))).is_ok());
        assert!(path("target_path", &format!("/{}", "p".repeat(4095))).is_err());
    }

    #[test]
    fn requests() {
        let mut r = NodePublishVolumeRequest {
            volume_id: "v".repeat(128),
            target_path: format!("/{}", "t".repeat(1000)),
            ..Default::default()
        };
        assert!(r.check_limits().is_ok(), "paths are not held to 128 bytes");
        r.volume_id.push('v');
        assert!(
            r.check_limits()
                .unwrap_err()
                .message()
                .contains("volume_id")
        );
        r.volume_id.pop();
        r.volume_capability = Some(VolumeCapability {
            access_mode: None,
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: vec!["a".repeat(100); 41],
                volume_mount_group: String::new(),
            })),
        });
        let e = r.check_limits().unwrap_err();
        assert!(
            e.message().contains("mount_flags is 4100 bytes in total"),
            "{}",
            e.message()
        );
        let mut c = CreateVolumeRequest {
            name: "n".into(),
            ..Default::default()
        };
        c.mutable_parameters = kv(5000);
        assert!(
            c.check_limits()
                .unwrap_err()
                .message()
                .contains("mutable_parameters")
        );
    }
}
