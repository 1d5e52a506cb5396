//! Every NFSv3 result type, chosen by the first byte, decoded from the rest.
#![no_main]

use bytes::Bytes;
use csi_nfs_fuse::nfs::*;
use csi_nfs_fuse::rpc::{Decode, XdrReader};
use libfuzzer_sys::fuzz_target;

fn result<T: Decode, F: Decode>(b: Bytes) {
    let mut r = XdrReader::new(b);
    if let Ok(status) = decode_status(&mut r) {
        if status == nfs3_types_status_ok() {
            let _ = T::decode(&mut r);
        } else {
            let _ = F::decode(&mut r);
        }
    }
}

fn nfs3_types_status_ok() -> nfs3_types::nfs3::nfsstat3 {
    nfs3_types::nfs3::nfsstat3::NFS3_OK
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let b = Bytes::copy_from_slice(rest);
    match which % 20 {
        0 => result::<GetattrOk, ()>(b),
        1 => result::<SetattrOk, WccFail>(b),
        2 => result::<LookupOk, AttrFail>(b),
        3 => result::<AccessOk, AttrFail>(b),
        4 => result::<ReadlinkOk, AttrFail>(b),
        5 => result::<ReadOk, AttrFail>(b),
        6 => result::<WriteOk, WccFail>(b),
        7 => result::<CreatedOk, WccFail>(b),
        8 => result::<RemoveOk, WccFail>(b),
        9 => result::<RenameOk, RenameFail>(b),
        10 => result::<LinkOk, LinkFail>(b),
        11 => result::<ReaddirOk, AttrFail>(b),
        12 => result::<ReaddirplusOk, AttrFail>(b),
        13 => result::<FsstatOk, AttrFail>(b),
        14 => result::<FsinfoOk, AttrFail>(b),
        15 => result::<PathconfOk, AttrFail>(b),
        16 => result::<CommitOk, WccFail>(b),
        17 => {
            let _ = Fattr::decode(&mut XdrReader::new(b));
        }
        18 => {
            let _ = Wcc::decode(&mut XdrReader::new(b));
        }
        _ => {
            let _ = FileHandle::decode(&mut XdrReader::new(b));
        }
    }
});
