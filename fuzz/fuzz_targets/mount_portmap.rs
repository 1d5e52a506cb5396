//! MOUNT v3 replies (MNT, EXPORT) and the portmap GETPORT result.
#![no_main]

use bytes::Bytes;
use csi_nfs_fuse::nfs::mount::{ExportEntry, MountReply};
use csi_nfs_fuse::rpc::xdr::decode_list;
use csi_nfs_fuse::rpc::{Decode, XdrReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let mut r = XdrReader::new(Bytes::copy_from_slice(rest));
    match which % 3 {
        0 => {
            let _ = MountReply::decode(&mut r);
        }
        1 => {
            let _ = decode_list::<ExportEntry>(&mut r, "exports", 1 << 16);
        }
        _ => {
            let _ = csi_nfs_fuse::nfs::mount::decode_port(&mut r);
        }
    }
});
