//! The CSI volume-ID codec: `VolumeRef::decode` of any string errors or
//! yields an ID that re-encodes to exactly the input and never leads outside
//! `<share>/<subDir>`; `encode` of any fields either fails or decodes back.
#![no_main]

use csi_nfs_fuse::csi::volume_id::{MAX_ID_LEN, OnDelete, VolumeRef};
use libfuzzer_sys::fuzz_target;

fn check_safe(v: &VolumeRef) {
    assert!(v.share.starts_with('/'), "{v:?}");
    assert!(
        !v.sub_dir.is_empty() && !v.sub_dir.starts_with('/'),
        "{v:?}"
    );
    assert!(
        !v.sub_dir.contains('\0') && !v.share.contains('\0'),
        "{v:?}"
    );
    for c in v.sub_dir.split('/').chain(v.share.split('/').skip(1)) {
        assert!(c != "." && c != "..", "{v:?}");
    }
    assert!(v.sub_dir.split('/').all(|c| !c.is_empty()), "{v:?}");
    assert!(!v.server.is_empty(), "{v:?}");
    assert!(v.full_path().starts_with(&v.share), "{v:?}");
}

fuzz_target!(|data: &[u8]| {
    // 1. Decode arbitrary text.
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(v) = VolumeRef::decode(s)
    {
        assert!(s.len() <= MAX_ID_LEN);
        check_safe(&v);
        assert_eq!(v.encode().as_deref(), Ok(s), "round trip of {s:?}");
    }
    // 2. Encode arbitrary fields: the first byte picks onDelete and the
    // ports, the rest is split into server, share and subDir at 0xff.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|b| *b == 0xff);
    let mut field = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (server, share, sub_dir) = (field(), field(), field());
    let port = |bit: u8, v: u16| (sel & bit != 0).then_some(v);
    let v = VolumeRef {
        server,
        share,
        sub_dir,
        on_delete: match sel % 3 {
            0 => OnDelete::Delete,
            1 => OnDelete::Retain,
            _ => OnDelete::Archive,
        },
        port: port(0x10, 1 + u16::from(sel)),
        mountport: port(0x20, 20048),
    };
    if let Ok(id) = v.encode() {
        assert!(id.len() <= MAX_ID_LEN, "{id}");
        check_safe(&v);
        assert_eq!(
            VolumeRef::decode(&id),
            Ok(v.clone()),
            "decode(encode({v:?}))"
        );
    }
});
