//! RPC reply headers (accepted/denied, verifier, accept_stat).
#![no_main]

use bytes::Bytes;
use csi_nfs_fuse::rpc::parse_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_reply(Bytes::copy_from_slice(data), 100_003, 3, 6);
});
