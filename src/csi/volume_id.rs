//! The one volume-ID codec.
//!
//! A volume ID carries everything DeleteVolume needs, because DeleteVolume
//! receives nothing else: `v1#SERVER#SHARE#SUBDIR#ONDELETE[#port=N][#mountport=N]`.
//! `%` and `#` inside a field are percent-encoded. The CSI spec caps IDs at
//! 128 bytes; a volume whose ID would be longer is refused at CreateVolume
//! (hashing it would lose what DeleteVolume must know).
//!
//! Decoding validates again: IDs come back from the CO and must never lead
//! us outside `<share>/<subDir>` (`..`, absolute or empty subDirs are refused).

use std::fmt;

/// CSI spec: "The total size of this field SHALL NOT exceed 128 bytes" (no override for volume_id).
pub const MAX_ID_LEN: usize = 128;
/// Longest name of one directory component (NAME_MAX).
pub const MAX_COMPONENT: usize = 255;
const VERSION: &str = "v1";

/// What DeleteVolume does with the volume's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnDelete {
    /// Remove the directory tree.
    #[default]
    Delete,
    /// Leave it alone.
    Retain,
    /// Rename it to `archived-<name>` in the same parent directory.
    Archive,
}

impl OnDelete {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        }
    }

    /// Case-insensitive parse of `delete`, `retain` or `archive`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "delete" => Some(OnDelete::Delete),
            "retain" => Some(OnDelete::Retain),
            "archive" => Some(OnDelete::Archive),
            _ => None,
        }
    }
}

impl fmt::Display for OnDelete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a volume lives and what to do with it on delete.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    /// Host name or IP address (IPv6 without brackets).
    pub server: String,
    /// Absolute export path, without a trailing slash (except "/").
    pub share: String,
    /// Relative directory below the share: non-empty components, no `.`/`..`.
    pub sub_dir: String,
    pub on_delete: OnDelete,
    /// NFS and MOUNT ports when the server has no portmapper.
    pub port: Option<u16>,
    pub mountport: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "volume id would be {len} bytes, over the CSI limit of {MAX_ID_LEN}; use a shorter server, share or subDir"
    )]
    TooLong { len: usize },
    #[error("not a csi-nfs-fuse volume id: {0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
}

/// Checks a server name: non-empty, no whitespace, control characters or '/'.
pub fn validate_server(server: &str) -> Result<(), IdError> {
    let bad = |why: &str| Err(IdError::Invalid(format!("server '{server}': {why}")));
    if server.is_empty() {
        return bad("must not be empty");
    }
    if server.len() > 253 + 2 {
        return bad("too long");
    }
    if server
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return bad("must be a host name or IP address");
    }
    Ok(())
}

/// Checks and normalises an export path: absolute, no NUL, no `.`/`..` or
/// empty components; a trailing slash is dropped.
pub fn normalize_share(share: &str) -> Result<String, IdError> {
    let bad = |why: &str| Err(IdError::Invalid(format!("share '{share}': {why}")));
    if !share.starts_with('/') {
        return bad("must be an absolute export path such as /export");
    }
    if share.contains('\0') {
        return bad("contains a NUL byte");
    }
    let trimmed = if share.len() > 1 {
        share.trim_end_matches('/')
    } else {
        share
    };
    let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
    if trimmed != "/" {
        for c in trimmed[1..].split('/') {
            if c.is_empty() {
                return bad("contains an empty path component");
            }
            if c == "." || c == ".." {
                return bad("must not contain '.' or '..'");
            }
        }
    }
    Ok(trimmed.to_string())
}

/// Checks a subdirectory: relative, non-empty components, no `.`/`..`, no NUL.
pub fn validate_sub_dir(sub_dir: &str) -> Result<(), IdError> {
    let bad = |why: &str| Err(IdError::Invalid(format!("subDir '{sub_dir}': {why}")));
    if sub_dir.is_empty() {
        return bad("must not be empty");
    }
    if sub_dir.starts_with('/') {
        return bad("must be relative to the share, not absolute");
    }
    if sub_dir.contains('\0') {
        return bad("contains a NUL byte");
    }
    for c in sub_dir.split('/') {
        if c.is_empty() {
            return bad("contains an empty path component");
        }
        if c == "." || c == ".." {
            return bad("must not contain '.' or '..'");
        }
        if c.len() > MAX_COMPONENT {
            return bad("a path component is longer than 255 bytes");
        }
    }
    Ok(())
}

impl VolumeRef {
    /// Validates every field (the same checks decode applies).
    pub fn validate(&self) -> Result<(), IdError> {
        validate_server(&self.server)?;
        if normalize_share(&self.share)? != self.share {
            return Err(IdError::Invalid(format!(
                "share '{}' is not normalised",
                self.share
            )));
        }
        validate_sub_dir(&self.sub_dir)
    }

    /// The subDir split into its components.
    pub fn components(&self) -> Vec<&str> {
        self.sub_dir.split('/').collect()
    }

    /// The export path plus subDir, as the mount command takes it.
    pub fn full_path(&self) -> String {
        if self.share == "/" {
            format!("/{}", self.sub_dir)
        } else {
            format!("{}/{}", self.share, self.sub_dir)
        }
    }

    /// `nfs://SERVER/SHARE/SUBDIR`, bracketing IPv6 literals.
    pub fn source_url(&self) -> String {
        let host = if self.server.contains(':') && !self.server.starts_with('[') {
            format!("[{}]", self.server)
        } else {
            self.server.clone()
        };
        format!("nfs://{}{}", host, self.full_path())
    }

    /// Encodes the ID; fails if it would not fit in 128 bytes.
    pub fn encode(&self) -> Result<String, IdError> {
        self.validate()?;
        let mut id = format!(
            "{VERSION}#{}#{}#{}#{}",
            escape(&self.server),
            escape(&self.share),
            escape(&self.sub_dir),
            self.on_delete
        );
        if let Some(p) = self.port {
            id.push_str(&format!("#port={p}"));
        }
        if let Some(p) = self.mountport {
            id.push_str(&format!("#mountport={p}"));
        }
        if id.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: id.len() });
        }
        Ok(id)
    }

    /// Decodes and validates an ID.
    pub fn decode(id: &str) -> Result<Self, IdError> {
        let malformed = || IdError::Malformed(id.chars().take(MAX_ID_LEN).collect());
        if id.len() > MAX_ID_LEN {
            return Err(malformed());
        }
        let fields: Vec<&str> = id.split('#').collect();
        if fields.len() < 5 || fields.len() > 7 || fields[0] != VERSION {
            return Err(malformed());
        }
        let server = unescape(fields[1]).ok_or_else(malformed)?;
        let share = unescape(fields[2]).ok_or_else(malformed)?;
        let sub_dir = unescape(fields[3]).ok_or_else(malformed)?;
        let on_delete = match fields[4] {
            "delete" => OnDelete::Delete,
            "retain" => OnDelete::Retain,
            "archive" => OnDelete::Archive,
            _ => return Err(malformed()),
        };
        let mut port = None;
        let mut mountport = None;
        for extra in &fields[5..] {
            let (k, v) = extra.split_once('=').ok_or_else(malformed)?;
            let v: u16 = v.parse().map_err(|_| malformed())?;
            let slot = match k {
                "port" => &mut port,
                "mountport" => &mut mountport,
                _ => return Err(malformed()),
            };
            if slot.replace(v).is_some() || v == 0 {
                return Err(malformed());
            }
        }
        let v = VolumeRef {
            server,
            share,
            sub_dir,
            on_delete,
            port,
            mountport,
        };
        v.validate()?;
        // Exactly one encoding per volume: a re-encoded ID must match.
        if v.encode()? != id {
            return Err(malformed());
        }
        Ok(v)
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        match code {
            "25" => out.push('%'),
            "23" => out.push('#'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(server: &str, share: &str, sub: &str) -> VolumeRef {
        VolumeRef {
            server: server.into(),
            share: share.into(),
            sub_dir: sub.into(),
            on_delete: OnDelete::Archive,
            port: None,
            mountport: None,
        }
    }

    #[test]
    fn round_trips() {
        let mut v = vol("10.0.0.1", "/srv/nfs", "vols/data 1");
        let id = v.encode().unwrap();
        assert_eq!(id, "v1#10.0.0.1#/srv/nfs#vols/data 1#archive");
        assert_eq!(VolumeRef::decode(&id).unwrap(), v);

        v.port = Some(2049);
        v.mountport = Some(20048);
        v.server = "fe80::1".into();
        v.sub_dir = "a#b%c".into();
        v.on_delete = OnDelete::Retain;
        let id = v.encode().unwrap();
        assert_eq!(
            id,
            "v1#fe80::1#/srv/nfs#a%23b%25c#retain#port=2049#mountport=20048"
        );
        assert_eq!(VolumeRef::decode(&id).unwrap(), v);
        assert_eq!(v.source_url(), "nfs://[fe80::1]/srv/nfs/a#b%c");
        assert_eq!(vol("h", "/", "x").full_path(), "/x");
    }

    #[test]
    fn refuses_traversal_and_garbage() {
        for sub in [
            "",
            "/abs",
            "../x",
            "a/../../b",
            "a//b",
            "a/",
            ".",
            "a/./b",
            "a\0b",
        ] {
            assert!(vol("h", "/e", sub).encode().is_err(), "{sub:?} accepted");
            let forged = format!("v1#h#/e#{sub}#delete");
            assert!(VolumeRef::decode(&forged).is_err(), "{forged:?} decoded");
        }
        for id in [
            "",
            "fake-vol-id-1",
            "v2#h#/e#s#delete",
            "v1#h#/e#s#maybe",
            "v1#h#e#s#delete",
            "v1#h#/e/../x#s#delete",
            "v1##/e#s#delete",
            "v1#h#/e#s#delete#port=0",
            "v1#h#/e#s#delete#port=1#port=2",
            "v1#h#/e#s#delete#color=red",
            "v1#h#/e#a%2fb#delete",
            "v1#h#/e/#s#delete",
        ] {
            assert!(VolumeRef::decode(id).is_err(), "{id:?} decoded");
        }
    }

    #[test]
    fn length_limit_is_enforced_and_named() {
        let v = vol("h", "/e", &"x".repeat(120));
        let e = v.encode().unwrap_err();
        assert!(e.to_string().contains("128"), "{e}");
        let v = vol("h", "/e", &"x".repeat(128 - "v1#h#/e##archive".len()));
        assert_eq!(v.encode().unwrap().len(), 128);
    }

    #[test]
    fn shares_are_normalised() {
        assert_eq!(normalize_share("/export/").unwrap(), "/export");
        assert_eq!(normalize_share("/").unwrap(), "/");
        assert!(normalize_share("export").is_err());
        assert!(normalize_share("/a/../b").is_err());
        assert!(normalize_share("/a//b").is_err());
    }
}
