//! CreateVolume parameters: `VolumeParams::parse` of any map and name gives
//! INVALID_ARGUMENT or parameters whose volume is safe, whose volume_context
//! parses back to the same parameters, and whose id (if it fits 128 bytes)
//! decodes back to the same volume.
#![no_main]

use std::collections::HashMap;

use csi_nfs_fuse::csi::params::VolumeParams;
use csi_nfs_fuse::csi::volume_id::{MAX_ID_LEN, VolumeRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Line 1 is the volume name; every further line is KEY=VALUE (a line
    // without '=' is a key with an empty value).
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let name = lines.next().unwrap_or_default();
    let mut params = HashMap::new();
    for l in lines {
        let (k, v) = l.split_once('=').unwrap_or((l, ""));
        params.insert(k.to_string(), v.to_string());
    }
    let p = match VolumeParams::parse(&params, name) {
        Ok(p) => p,
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
            assert!(!e.message().is_empty());
            return;
        }
    };
    let v = &p.volume;
    v.validate().expect("parsed volume validates");
    assert!(v.share.starts_with('/'));
    assert!(!v.sub_dir.starts_with('/') && !v.sub_dir.contains('\0'));
    assert!(
        v.sub_dir
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    );
    if let Some(m) = p.mount_permissions {
        assert!(m <= 0o7777);
    }
    // What NodePublish gets back describes the same volume.
    let again = VolumeParams::parse(&p.volume_context(), "unused-name")
        .unwrap_or_else(|e| panic!("volume_context of {p:?} does not parse: {}", e.message()));
    assert_eq!(again, p);
    match v.encode() {
        Ok(id) => {
            assert!(id.len() <= MAX_ID_LEN);
            assert_eq!(VolumeRef::decode(&id).as_ref(), Ok(v));
        }
        Err(e) => assert!(e.to_string().contains("128"), "{e}"),
    }
});
