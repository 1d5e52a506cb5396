//! CreateVolume parameters (`docker volume create --opt KEY=VALUE`) and the
//! volume_context they turn into. Keys are case-insensitive; unknown keys
//! are refused by name so a typo never silently changes behaviour.

use std::collections::{BTreeMap, HashMap};

use tonic::Status;

use super::volume_id::{self, OnDelete, VolumeRef};
use crate::options::MountOptions;

pub const SERVER: &str = "server";
pub const SHARE: &str = "share";
pub const SUB_DIR: &str = "subDir";
pub const MOUNT_PERMISSIONS: &str = "mountPermissions";
pub const ON_DELETE: &str = "onDelete";
pub const MOUNT_OPTIONS: &str = "mountOptions";

const KNOWN: [&str; 6] = [
    SERVER,
    SHARE,
    SUB_DIR,
    MOUNT_PERMISSIONS,
    ON_DELETE,
    MOUNT_OPTIONS,
];

/// Keys Kubernetes' external-provisioner adds with --extra-create-metadata;
/// accepted and ignored so the driver also runs there.
const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// Parsed, validated CreateVolume parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub volume: VolumeRef,
    /// Mode for the volume directory (chmod after MKDIR), e.g. 0o777.
    pub mount_permissions: Option<u32>,
    /// The `-o` list for every mount of this volume, as given (trimmed).
    pub mount_options: String,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Finds each known key case-insensitively; refuses unknown and duplicate keys.
fn by_key(params: &HashMap<String, String>) -> Result<BTreeMap<&'static str, &str>, Status> {
    let mut found: BTreeMap<&'static str, &str> = BTreeMap::new();
    let mut unknown: Vec<&str> = Vec::new();
    for (k, v) in params {
        match KNOWN.iter().find(|known| known.eq_ignore_ascii_case(k)) {
            Some(known) => {
                if found.insert(known, v.as_str()).is_some() {
                    return Err(invalid(format!(
                        "parameter '{known}' is given more than once (keys are case-insensitive)"
                    )));
                }
            }
            None if k.starts_with(K8S_PREFIX) => {}
            None => unknown.push(k),
        }
    }
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(invalid(format!(
            "unknown parameter{} {}; supported: {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", "),
            KNOWN.join(", ")
        )));
    }
    Ok(found)
}

/// Parses an octal mode such as `0777`, `777` or `0o2775`.
pub fn parse_mode(s: &str) -> Result<u32, Status> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(m),
        _ => Err(invalid(format!(
            "parameter {MOUNT_PERMISSIONS}='{s}': expected an octal mode such as 0777"
        ))),
    }
}

/// Validates a `-o` list; errors name the option.
pub fn check_mount_options(key: &str, list: &str) -> Result<MountOptions, Status> {
    MountOptions::parse(list).map_err(|e| invalid(format!("{key}: {e}")))
}

impl VolumeParams {
    /// Parses CreateVolume parameters; `name` is the default subDir.
    pub fn parse(params: &HashMap<String, String>, name: &str) -> Result<Self, Status> {
        let p = by_key(params)?;
        let server = p
            .get(SERVER)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(format!("parameter '{SERVER}' is required")))?;
        volume_id::validate_server(server).map_err(|e| invalid(e.to_string()))?;
        let share = p
            .get(SHARE)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(format!("parameter '{SHARE}' is required")))?;
        let share = volume_id::normalize_share(share).map_err(|e| invalid(e.to_string()))?;
        // The value was trimmed, so whitespace that only a trailing '/' kept
        // from the trim would be trimmed from the volume_context next time:
        // refuse rather than have two readings of one share (found by the
        // csi_params fuzz target).
        if share.trim_end() != share {
            return Err(invalid(format!(
                "share '{share}/': its last component ends in whitespace"
            )));
        }
        let sub_dir = match p.get(SUB_DIR) {
            Some(s) => s.to_string(),
            None => name.to_string(),
        };
        volume_id::validate_sub_dir(&sub_dir).map_err(|e| {
            if p.contains_key(SUB_DIR) {
                invalid(e.to_string())
            } else {
                invalid(format!("the volume name is used as subDir: {e}"))
            }
        })?;
        let on_delete = match p.get(ON_DELETE) {
            None => OnDelete::default(),
            Some(v) => OnDelete::parse(v.trim()).ok_or_else(|| {
                invalid(format!(
                    "parameter {ON_DELETE}='{v}': expected delete, retain or archive"
                ))
            })?,
        };
        let mount_permissions = match p.get(MOUNT_PERMISSIONS) {
            None => None,
            Some(v) => Some(parse_mode(v)?),
        };
        let mount_options = p.get(MOUNT_OPTIONS).map(|s| s.trim()).unwrap_or("");
        let opts = check_mount_options(MOUNT_OPTIONS, mount_options)?;
        let volume = VolumeRef {
            server: server.to_string(),
            share,
            sub_dir,
            on_delete,
            port: opts.port,
            mountport: opts.mountport,
        };
        Ok(Self {
            volume,
            mount_permissions,
            mount_options: mount_options.to_string(),
        })
    }

    /// The options for controller-side NFS calls (ports and such).
    pub fn options(&self) -> MountOptions {
        MountOptions::parse(&self.mount_options).unwrap_or_default()
    }

    /// What NodePublishVolume needs, returned as the volume_context.
    pub fn volume_context(&self) -> HashMap<String, String> {
        let mut c = HashMap::new();
        c.insert(SERVER.into(), self.volume.server.clone());
        c.insert(SHARE.into(), self.volume.share.clone());
        c.insert(SUB_DIR.into(), self.volume.sub_dir.clone());
        c.insert(ON_DELETE.into(), self.volume.on_delete.to_string());
        if !self.mount_options.is_empty() {
            c.insert(MOUNT_OPTIONS.into(), self.mount_options.clone());
        }
        if let Some(m) = self.mount_permissions {
            c.insert(MOUNT_PERMISSIONS.into(), format!("{m:04o}"));
        }
        c
    }
}

/// Reads a key of a volume_context case-insensitively.
pub fn context_get<'a>(ctx: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    ctx.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_all_keys_case_insensitively() {
        let p = VolumeParams::parse(
            &map(&[
                ("SERVER", "10.0.0.1"),
                ("Share", "/export/"),
                ("subdir", "a/b"),
                ("MountPermissions", "0775"),
                ("ONDELETE", "Archive"),
                ("mountoptions", "nconnect=2,port=2049,mountport=20048"),
                ("csi.storage.k8s.io/pvc/name", "x"),
            ]),
            "vol",
        )
        .unwrap();
        assert_eq!(p.volume.share, "/export");
        assert_eq!(p.volume.sub_dir, "a/b");
        assert_eq!(p.volume.on_delete, OnDelete::Archive);
        assert_eq!(
            (p.volume.port, p.volume.mountport),
            (Some(2049), Some(20048))
        );
        assert_eq!(p.mount_permissions, Some(0o775));
        let ctx = p.volume_context();
        assert_eq!(ctx["mountPermissions"], "0775");
        assert_eq!(ctx["mountOptions"], "nconnect=2,port=2049,mountport=20048");
    }

    #[test]
    fn defaults() {
        let p = VolumeParams::parse(&map(&[("server", "h"), ("share", "/e")]), "myvol").unwrap();
        assert_eq!(p.volume.sub_dir, "myvol");
        assert_eq!(p.volume.on_delete, OnDelete::Delete);
        assert_eq!(p.mount_permissions, None);
        assert!(!p.volume_context().contains_key("mountOptions"));
    }

    #[test]
    fn errors_name_the_problem() {
        for (kv, needle) in [
            (vec![("share", "/e")], "'server' is required"),
            (vec![("server", "h")], "'share' is required"),
            (
                vec![
                    ("server", "h"),
                    ("share", "/e"),
                    ("colour", "red"),
                    ("bogus", "1"),
                ],
                "'bogus', 'colour'",
            ),
            (
                vec![("server", "h"), ("Server", "g"), ("share", "/e")],
                "more than once",
            ),
            (vec![("server", "h"), ("share", "e")], "absolute"),
            (
                vec![("server", "h"), ("share", "/e"), ("subDir", "../x")],
                "..",
            ),
            (
                vec![("server", "h"), ("share", "/e"), ("subDir", "/abs")],
                "absolute",
            ),
            (
                vec![
                    ("server", "h"),
                    ("share", "/e"),
                    ("mountPermissions", "rwx"),
                ],
                "octal",
            ),
            (
                vec![("server", "h"), ("share", "/e"), ("mountPermissions", "99")],
                "octal",
            ),
            (
                vec![("server", "h"), ("share", "/e"), ("onDelete", "shred")],
                "shred",
            ),
            (
                vec![
                    ("server", "h"),
                    ("share", "/e"),
                    ("mountOptions", "nconnect=99"),
                ],
                "nconnect=99",
            ),
            (vec![("server", "a b"), ("share", "/e")], "server"),
            (vec![("server", "h"), ("share", "/e /")], "whitespace"),
        ] {
            let e = VolumeParams::parse(&map(&kv), "v").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(needle), "{kv:?}: {}", e.message());
        }
        let e =
            VolumeParams::parse(&map(&[("server", "h"), ("share", "/e")]), "a/../..").unwrap_err();
        assert!(e.message().contains("volume name"), "{}", e.message());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("777").unwrap(), 0o777);
        assert_eq!(parse_mode("0o2775").unwrap(), 0o2775);
        assert!(parse_mode("").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
