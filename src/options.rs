//! The mount source (`nfs://host[:port]/export` or `host:/export`) and `-o`
//! options, with nfs(5) names where the meaning is the same. Everything is
//! validated before anything is mounted; errors name the offending option.

use std::time::Duration;

use crate::nfs::ConnectConfig;
use crate::rpc::RpcConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("unknown mount option '{0}'")]
    Unknown(String),
    #[error("mount option '{name}' needs a value ({expected})")]
    MissingValue {
        name: String,
        expected: &'static str,
    },
    #[error("mount option '{name}' does not take a value")]
    UnexpectedValue { name: String },
    #[error("mount option '{name}={value}': {reason}")]
    BadValue {
        name: String,
        value: String,
        reason: String,
    },
    #[error("invalid NFS source '{spec}': {reason}")]
    BadSource { spec: String, reason: String },
}

/// `lookupcache=`: which directory-entry results may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupCache {
    All,
    Positive,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MountOptions {
    pub rsize: Option<u32>,
    pub wsize: Option<u32>,
    /// Retransmit timeout, from `timeo=` in tenths of a second.
    pub timeo: Duration,
    pub retrans: u32,
    pub hard: bool,
    pub nconnect: usize,
    pub port: Option<u16>,
    pub mountport: Option<u16>,
    pub resvport: bool,
    pub read_only: bool,
    pub acregmin: Duration,
    pub acregmax: Duration,
    pub acdirmin: Duration,
    pub acdirmax: Duration,
    pub lookupcache: LookupCache,
    /// Forced AUTH_SYS identity instead of the caller's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub allow_other: bool,
    /// Page cache bound in bytes.
    pub cache_size: u64,
    /// Threads reading FUSE requests (`fuse_threads=`). A request never
    /// blocks its thread (one that waits on the server is parked), so one
    /// thread keeps up, and takes requests that queued meanwhile without a
    /// wake-up each; more threads only spread them (measured in the README).
    pub fuse_threads: usize,
    pub fsname: Option<String>,
    pub debug: bool,
    /// Close-to-open consistency (`cto`, default) or not (`nocto`).
    pub cto: bool,
    pub rdirplus: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            rsize: None,
            wsize: None,
            timeo: Duration::from_secs(60),
            retrans: 2,
            hard: true,
            nconnect: 1,
            port: None,
            mountport: None,
            resvport: true,
            read_only: false,
            acregmin: Duration::from_secs(3),
            acregmax: Duration::from_secs(60),
            acdirmin: Duration::from_secs(30),
            acdirmax: Duration::from_secs(60),
            lookupcache: LookupCache::All,
            uid: None,
            gid: None,
            allow_other: false,
            cache_size: 256 << 20,
            fuse_threads: 1,
            fsname: None,
            debug: false,
            cto: true,
            rdirplus: true,
        }
    }
}

/// Options that mount(8) passes to every helper and that have no NFS meaning;
/// the kernel VFS flags among them are applied by the FUSE mount itself.
const GENERIC: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "async",
    "silent",
    "loud",
    "ac",
    "nolock",
    "sharecache",
    "intr",
    "nointr",
    "fg",
    "bg",
];

fn num<T: std::str::FromStr>(
    name: &str,
    value: &str,
    expected: &'static str,
) -> Result<T, OptionError> {
    value.parse().map_err(|_| OptionError::BadValue {
        name: name.into(),
        value: value.into(),
        reason: format!("expected {expected}"),
    })
}

fn bad(name: &str, value: &str, reason: impl Into<String>) -> OptionError {
    OptionError::BadValue {
        name: name.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Parses sizes like `512M`, `1G`, `65536`.
pub fn parse_size(name: &str, value: &str) -> Result<u64, OptionError> {
    let v = value.trim();
    let (digits, mult) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(bad(name, value, "unknown size suffix (use K, M, G or T)")),
            };
            (&v[..i], mult)
        }
        _ => (v, 1),
    };
    let n: u64 = num(name, digits, "a size such as 512M")?;
    n.checked_mul(mult)
        .ok_or_else(|| bad(name, value, "too large"))
}

impl MountOptions {
    /// Parses a comma-separated option list on top of the defaults.
    pub fn parse(list: &str) -> Result<Self, OptionError> {
        let mut o = Self::default();
        o.apply(list)?;
        Ok(o)
    }

    /// Applies a comma-separated option list; later options win.
    pub fn apply(&mut self, list: &str) -> Result<(), OptionError> {
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = match raw.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (raw, None),
            };
            self.apply_one(name, value)?;
        }
        if self.acregmin > self.acregmax {
            return Err(bad(
                "acregmin",
                &self.acregmin.as_secs().to_string(),
                "exceeds acregmax",
            ));
        }
        if self.acdirmin > self.acdirmax {
            return Err(bad(
                "acdirmin",
                &self.acdirmin.as_secs().to_string(),
                "exceeds acdirmax",
            ));
        }
        Ok(())
    }

    fn apply_one(&mut self, name: &str, value: Option<&str>) -> Result<(), OptionError> {
        let need = |expected: &'static str| {
            value.ok_or(OptionError::MissingValue {
                name: name.into(),
                expected,
            })
        };
        let flag = |o: &mut Self, f: fn(&mut Self)| {
            if value.is_some() {
                return Err(OptionError::UnexpectedValue { name: name.into() });
            }
            f(o);
            Ok(())
        };
        let secs = |v: &str| -> Result<Duration, OptionError> {
            Ok(Duration::from_secs(num::<u64>(name, v, "seconds")?))
        };
        match name {
            "rsize" | "wsize" => {
                let v = need("bytes")?;
                let n = parse_size(name, v)?;
                if !(4096..=(64 << 20)).contains(&n) {
                    return Err(bad(name, v, "must be between 4096 and 64M"));
                }
                if name == "rsize" {
                    self.rsize = Some(n as u32)
                } else {
                    self.wsize = Some(n as u32)
                }
            }
            "timeo" => {
                let v = need("tenths of a second")?;
                let n: u64 = num(name, v, "tenths of a second")?;
                if n == 0 || n > 6000 {
                    return Err(bad(
                        name,
                        v,
                        "must be between 1 and 6000 tenths of a second",
                    ));
                }
                self.timeo = Duration::from_millis(n * 100);
            }
            "retrans" => {
                let v = need("a count")?;
                let n: u32 = num(name, v, "a count")?;
                if n > 100 {
                    return Err(bad(name, v, "must be at most 100"));
                }
                self.retrans = n;
            }
            "hard" => flag(self, |o| o.hard = true)?,
            "soft" | "softerr" => flag(self, |o| o.hard = false)?,
            "nconnect" => {
                let v = need("1 to 16")?;
                let n: usize = num(name, v, "a number from 1 to 16")?;
                if !(1..=16).contains(&n) {
                    return Err(bad(name, v, "must be between 1 and 16"));
                }
                self.nconnect = n;
            }
            "port" | "mountport" => {
                let v = need("a port number")?;
                let n: u16 = num(name, v, "a port number")?;
                // port=0 means "ask the portmapper", as in nfs(5).
                let p = (n != 0).then_some(n);
                if name == "port" {
                    self.port = p
                } else {
                    self.mountport = p
                }
            }
            "resvport" => flag(self, |o| o.resvport = true)?,
            "noresvport" => flag(self, |o| o.resvport = false)?,
            "ro" => flag(self, |o| o.read_only = true)?,
            "rw" => flag(self, |o| o.read_only = false)?,
            "actimeo" => {
                let d = secs(need("seconds")?)?;
                self.acregmin = d;
                self.acregmax = d;
                self.acdirmin = d;
                self.acdirmax = d;
            }
            "acregmin" => self.acregmin = secs(need("seconds")?)?,
            "acregmax" => self.acregmax = secs(need("seconds")?)?,
            "acdirmin" => self.acdirmin = secs(need("seconds")?)?,
            "acdirmax" => self.acdirmax = secs(need("seconds")?)?,
            "noac" => flag(self, |o| {
                o.acregmin = Duration::ZERO;
                o.acregmax = Duration::ZERO;
                o.acdirmin = Duration::ZERO;
                o.acdirmax = Duration::ZERO;
            })?,
            "lookupcache" => {
                let v = need("all, positive or none")?;
                self.lookupcache = match v {
                    "all" => LookupCache::All,
                    "pos" | "positive" => LookupCache::Positive,
                    "none" => LookupCache::None,
                    _ => return Err(bad(name, v, "expected all, positive or none")),
                };
            }
            "uid" | "gid" => {
                let v = need("a numeric id")?;
                let n: u32 = num(name, v, "a numeric id")?;
                if name == "uid" {
                    self.uid = Some(n)
                } else {
                    self.gid = Some(n)
                }
            }
            "allow_other" => flag(self, |o| o.allow_other = true)?,
            "cache_size" => self.cache_size = parse_size(name, need("a size such as 512M")?)?,
            "fuse_threads" => {
                let v = need("1 to 64")?;
                let n: usize = num(name, v, "a number from 1 to 64")?;
                if !(1..=64).contains(&n) {
                    return Err(bad(name, v, "must be between 1 and 64"));
                }
                self.fuse_threads = n;
            }
            "fsname" => {
                let v = need("a name")?;
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(bad(name, v, "must be non-empty without spaces"));
                }
                self.fsname = Some(v.into());
            }
            "debug" => flag(self, |o| o.debug = true)?,
            "cto" => flag(self, |o| o.cto = true)?,
            "nocto" => flag(self, |o| o.cto = false)?,
            "rdirplus" => flag(self, |o| o.rdirplus = true)?,
            "nordirplus" => flag(self, |o| o.rdirplus = false)?,
            "vers" | "nfsvers" => {
                let v = need("3")?;
                if v != "3" {
                    return Err(bad(name, v, "only NFS version 3 is supported"));
                }
            }
            "proto" => {
                let v = need("tcp")?;
                if v != "tcp" && v != "tcp6" {
                    return Err(bad(name, v, "only TCP is supported"));
                }
            }
            "sec" => {
                let v = need("sys")?;
                if v != "sys" {
                    return Err(bad(name, v, "only sec=sys (AUTH_SYS) is supported"));
                }
            }
            "sync" => {
                return Err(bad(
                    name,
                    "",
                    "synchronous mounts are not supported; use fsync",
                ));
            }
            _ if GENERIC.contains(&name)
                || name.starts_with("x-")
                || name.starts_with("comment") => {}
            _ => return Err(OptionError::Unknown(name.into())),
        }
        Ok(())
    }

    /// Transport and handshake settings derived from these options.
    pub fn connect_config(&self) -> ConnectConfig {
        ConnectConfig {
            rpc: RpcConfig {
                timeo: self.timeo,
                retrans: self.retrans,
                hard: self.hard,
                nconnect: self.nconnect,
                resvport: self.resvport,
                ..Default::default()
            },
            port: self.port,
            mountport: self.mountport,
            rsize: self.rsize,
            wsize: self.wsize,
            handshake_timeout: self
                .timeo
                .clamp(Duration::from_secs(2), Duration::from_secs(15)),
        }
    }
}

/// Where to mount from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsSource {
    pub host: String,
    pub port: Option<u16>,
    /// Export path, possibly with a subdirectory below the export.
    pub path: String,
}

impl NfsSource {
    /// Parses `nfs://host[:port]/export[/subdir]`, `host:/export` or `[v6]:/export`.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let bad = |reason: &str| OptionError::BadSource {
            spec: s.into(),
            reason: reason.into(),
        };
        let (host, port, path) = if let Some(rest) = s.strip_prefix("nfs://") {
            let slash = rest
                .find('/')
                .ok_or_else(|| bad("missing the export path after the host"))?;
            let (authority, path) = rest.split_at(slash);
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let end = v6
                    .find(']')
                    .ok_or_else(|| bad("unterminated [IPv6] address"))?;
                let port = match &v6[end + 1..] {
                    "" => None,
                    p => Some(p.strip_prefix(':').ok_or_else(|| bad("garbage after ]"))?),
                };
                (v6[..end].to_string(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            let port = match port {
                Some(p) => Some(
                    p.parse::<u16>()
                        .map_err(|_| bad("port is not a number from 1 to 65535"))?,
                ),
                None => None,
            };
            (host, port, path.to_string())
        } else if let Some(v6) = s.strip_prefix('[') {
            let end = v6
                .find("]:")
                .ok_or_else(|| bad("expected [IPv6]:/export"))?;
            (v6[..end].to_string(), None, v6[end + 2..].to_string())
        } else {
            let (h, p) = s
                .split_once(':')
                .ok_or_else(|| bad("expected nfs://HOST/EXPORT or HOST:/EXPORT"))?;
            (h.to_string(), None, p.to_string())
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if !path.starts_with('/') {
            return Err(bad("the export path must be absolute"));
        }
        if path.contains('\0') {
            return Err(bad("the export path contains a NUL byte"));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(bad("the export path must not contain '..'"));
        }
        let path = if path.len() > 1 {
            path.trim_end_matches('/').to_string()
        } else {
            path
        };
        Ok(Self { host, port, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_nfs5() {
        let o = MountOptions::default();
        assert_eq!(
            (o.timeo, o.retrans, o.hard),
            (Duration::from_secs(60), 2, true)
        );
        assert_eq!((o.acregmin.as_secs(), o.acregmax.as_secs()), (3, 60));
        assert_eq!((o.acdirmin.as_secs(), o.acdirmax.as_secs()), (30, 60));
    }

    #[test]
    fn parses_nfs_and_own_options() {
        let o = MountOptions::parse(
            "rsize=65536,wsize=1M,timeo=15,retrans=3,soft,nconnect=4,port=2049,mountport=20048,noresvport,ro,actimeo=5,lookupcache=positive,uid=1000,gid=100,allow_other,cache_size=512M,fuse_threads=3,fsname=vol1,debug,nodev,nosuid,_netdev",
        )
        .unwrap();
        assert_eq!(o.rsize, Some(65536));
        assert_eq!(o.wsize, Some(1 << 20));
        assert_eq!(o.timeo, Duration::from_millis(1500));
        assert!(!o.hard && !o.resvport && o.read_only && o.allow_other && o.debug);
        assert_eq!(
            (o.nconnect, o.port, o.mountport),
            (4, Some(2049), Some(20048))
        );
        assert_eq!(o.acdirmax, Duration::from_secs(5));
        assert_eq!(o.lookupcache, LookupCache::Positive);
        assert_eq!(
            (o.uid, o.gid, o.cache_size, o.fuse_threads),
            (Some(1000), Some(100), 512 << 20, 3)
        );
        let o = MountOptions::parse("noac").unwrap();
        assert_eq!(o.acregmax, Duration::ZERO);
    }

    #[test]
    fn bad_options_name_themselves() {
        for (opt, needle) in [
            ("bogus", "'bogus'"),
            ("nconnect=17", "nconnect=17"),
            ("nconnect", "nconnect"),
            ("timeo=abc", "timeo=abc"),
            ("rsize=100", "rsize=100"),
            ("hard=1", "'hard'"),
            ("vers=4", "vers=4"),
            ("lookupcache=maybe", "lookupcache=maybe"),
            ("cache_size=12X", "cache_size=12X"),
            ("fuse_threads=0", "fuse_threads=0"),
            ("acregmin=10,acregmax=5", "acregmin"),
        ] {
            let e = MountOptions::parse(opt).unwrap_err().to_string();
            assert!(e.contains(needle), "{opt}: {e}");
        }
    }

    #[test]
    fn sources() {
        let s = NfsSource::parse("nfs://10.0.0.1:2050/mnt/share/sub/").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.path.as_str()),
            ("10.0.0.1", Some(2050), "/mnt/share/sub")
        );
        let s = NfsSource::parse("server.example:/export").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.path.as_str()),
            ("server.example", None, "/export")
        );
        let s = NfsSource::parse("nfs://[::1]:2049/e").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", Some(2049)));
        let s = NfsSource::parse("[fe80::1]:/e").unwrap();
        assert_eq!(s.host, "fe80::1");
        for bad in [
            "nfs://host",
            "host",
            "host:relative",
            "nfs:///e",
            "h:/a/../b",
            "nfs://h:99999/e",
        ] {
            assert!(NfsSource::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
