//! Record-marking reassembly: arbitrary bytes, delivered in arbitrary pieces,
//! must yield records or a clean error, never a panic or a huge buffer.
#![no_main]

use bytes::BytesMut;
use csi_nfs_fuse::rpc::record::RecordDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let step = (split as usize % 64) + 1;
    let mut dec = RecordDecoder::new(1 << 16);
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(rec)) => {
                    assert!(rec.len() <= 1 << 16);
                    total += rec.len();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= (1 << 16) + 4 + rest.len() + 4096);
    }
    assert!(total <= rest.len());
});
