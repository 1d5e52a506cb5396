//! AUTH_SYS credentials (RFC 5531 appendix A), chosen per call.

use std::sync::Arc;

use bytes::BufMut;

/// RFC 5531 caps AUTH_SYS at 16 supplementary groups; servers reject more.
pub const MAX_AUTH_GIDS: usize = 16;
const MAX_MACHINE_NAME: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    /// AUTH_NONE: used for portmap, where identity does not matter.
    None,
    Sys(AuthSys),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthSys {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; anything past the sixteenth is dropped, as the
    /// kernel client does.
    pub gids: Vec<u32>,
    pub machine_name: Arc<str>,
}

impl AuthSys {
    pub fn new(uid: u32, gid: u32, gids: Vec<u32>, machine_name: Arc<str>) -> Self {
        Self {
            uid,
            gid,
            gids,
            machine_name,
        }
    }

    /// The identity of this process, named after this host.
    pub fn current_process() -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        Self::new(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
            Vec::new(),
            host.into(),
        )
    }
}

impl Credential {
    /// Encodes the `opaque_auth` credential followed by an AUTH_NONE verifier.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Credential::None => {
                out.put_u32(0);
                out.put_u32(0);
            }
            Credential::Sys(a) => {
                let name = a.machine_name.as_bytes();
                let name = &name[..name.len().min(MAX_MACHINE_NAME)];
                let gids = &a.gids[..a.gids.len().min(MAX_AUTH_GIDS)];
                let body_len = 4 + 4 + pad4(name.len()) + 4 + 4 + 4 + 4 * gids.len();
                out.put_u32(1); // AUTH_SYS
                out.put_u32(body_len as u32);
                out.put_u32(0); // stamp: servers ignore it
                out.put_u32(name.len() as u32);
                out.put_slice(name);
                out.put_bytes(0, pad4(name.len()) - name.len());
                out.put_u32(a.uid);
                out.put_u32(a.gid);
                out.put_u32(gids.len() as u32);
                for g in gids {
                    out.put_u32(*g);
                }
            }
        }
        // verifier: AUTH_NONE
        out.put_u32(0);
        out.put_u32(0);
    }
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfs3_types::rpc::{auth_flavor, auth_unix, opaque_auth};
    use nfs3_types::xdr_codec::Unpack;

    #[test]
    fn auth_sys_matches_nfs3_types_layout() {
        let cred = Credential::Sys(AuthSys::new(1000, 100, (0..20).collect(), "host-a".into()));
        let mut out = Vec::new();
        cred.encode(&mut out);
        let mut cur = std::io::Cursor::new(&out[..]);
        let (auth, _) = opaque_auth::unpack(&mut cur).unwrap();
        assert_eq!(auth.flavor, auth_flavor::AUTH_UNIX);
        let (body, _) = auth_unix::unpack(&mut std::io::Cursor::new(&auth.body[..])).unwrap();
        assert_eq!((body.uid, body.gid), (1000, 100));
        assert_eq!(
            body.gids,
            (0..16).collect::<Vec<_>>(),
            "capped at 16 groups"
        );
        assert_eq!(&body.machinename[..], b"host-a");
        let (verf, _) = opaque_auth::unpack(&mut cur).unwrap();
        assert_eq!(verf.flavor, auth_flavor::AUTH_NULL);
        assert_eq!(cur.position() as usize, out.len());
    }
}
