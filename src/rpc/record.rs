//! ONC RPC record marking over a byte stream (RFC 5531 §11).
//!
//! A record is a sequence of fragments, each preceded by a 4-byte header whose
//! top bit marks the last fragment. The decoder is a pure state machine over a
//! `BytesMut` so the network reader and the fuzzer drive the same code.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::RpcError;

const LAST_FRAGMENT: u32 = 0x8000_0000;
const LENGTH_MASK: u32 = 0x7FFF_FFFF;

/// Largest fragment we emit. Servers accept larger ones, but splitting big
/// WRITE calls keeps us honest about reassembly on both sides.
pub const MAX_SEND_FRAGMENT: usize = 1 << 20;

/// Reassembles records from a stream, refusing any record longer than `max_record`.
#[derive(Debug)]
pub struct RecordDecoder {
    max_record: usize,
    /// Payload of fragments already seen for the record being assembled.
    partial: BytesMut,
    /// Whether `partial` holds at least one complete, non-final fragment.
    in_record: bool,
}

impl RecordDecoder {
    pub fn new(max_record: usize) -> Self {
        Self {
            max_record,
            partial: BytesMut::new(),
            in_record: false,
        }
    }

    /// The XID of the record being decoded (its first word), once `buf` or
    /// the fragments before hold it.
    pub fn record_xid(&self, buf: &[u8]) -> Option<u32> {
        // Earlier fragments may hold fewer than four bytes of it; the rest
        // starts after the current fragment's header.
        let mut word = [0u8; 4];
        let have = self.partial.len().min(4);
        word[..have].copy_from_slice(&self.partial[..have]);
        if have < 4 {
            word[have..].copy_from_slice(buf.get(4..8 - have)?);
        }
        Some(u32::from_be_bytes(word))
    }

    /// Takes the next complete record out of `buf`, if there is one.
    ///
    /// Consumed fragments are removed from `buf`. When a record fits in one
    /// fragment (the common case) the payload is split off without copying.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, RpcError> {
        loop {
            if buf.len() < 4 {
                return Ok(None);
            }
            let header = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let len = (header & LENGTH_MASK) as usize;
            let last = header & LAST_FRAGMENT != 0;
            let total = self.partial.len().saturating_add(len);
            if total > self.max_record {
                if self.record_xid(buf).is_none() {
                    // Refused once its XID is in: the reader fails that one
                    // call rather than sending it again for ever.
                    return Ok(None);
                }
                return Err(RpcError::RecordTooLarge {
                    len: total,
                    max: self.max_record,
                });
            }
            if buf.len() < 4 + len {
                // Room for the rest of this fragment, so the reader fills it
                // with few syscalls; the cap above bounds it. A fresh buffer
                // copies only the bytes held, where `reserve` may realloc
                // and copy the old allocation's whole capacity.
                if buf.capacity() < 4 + len {
                    let mut fresh = BytesMut::with_capacity(4 + len);
                    fresh.extend_from_slice(buf);
                    *buf = fresh;
                }
                return Ok(None);
            }
            buf.advance(4);
            let fragment = buf.split_to(len);
            if last {
                if !self.in_record {
                    return Ok(Some(fragment.freeze()));
                }
                self.partial.extend_from_slice(&fragment);
                self.in_record = false;
                return Ok(Some(std::mem::take(&mut self.partial).freeze()));
            }
            self.partial.extend_from_slice(&fragment);
            self.in_record = true;
        }
    }
}

/// Splits `payload` into record-marked fragments of at most `max_fragment`
/// bytes: (header, slice) pairs, the last one flagged, at least one (an
/// empty record is one empty last fragment). The slices borrow the payload,
/// so a sender can write them without copying.
pub fn fragments(payload: &[u8], max_fragment: usize) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    fragment_bounds(payload.len(), max_fragment).map(move |(header, r)| (header, &payload[r]))
}

/// [`fragments`] as byte ranges of a payload of `len` bytes, for payloads
/// held in several buffers.
pub fn fragment_bounds(
    len: usize,
    max_fragment: usize,
) -> impl Iterator<Item = ([u8; 4], std::ops::Range<usize>)> {
    let max_fragment = max_fragment.clamp(1, LENGTH_MASK as usize);
    let count = len.div_ceil(max_fragment).max(1);
    (0..count).map(move |k| {
        let range = (k * max_fragment).min(len)..((k + 1) * max_fragment).min(len);
        let mut header = range.len() as u32;
        if k + 1 == count {
            header |= LAST_FRAGMENT;
        }
        (header.to_be_bytes(), range)
    })
}

/// Appends `payload` to `out` as one record, split into fragments of at most
/// `max_fragment` bytes.
pub fn encode_record(out: &mut BytesMut, payload: &[u8], max_fragment: usize) {
    for (header, chunk) in fragments(payload, max_fragment) {
        out.put_slice(&header);
        out.put_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(payload: &[u8], frag: usize) -> Vec<u8> {
        let mut wire = BytesMut::new();
        encode_record(&mut wire, payload, frag);
        let mut dec = RecordDecoder::new(1 << 20);
        let rec = dec.decode(&mut wire).unwrap().expect("complete record");
        assert!(wire.is_empty());
        rec.to_vec()
    }

    #[test]
    fn single_and_multi_fragment_records_reassemble() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&payload, 1 << 20), payload);
        assert_eq!(roundtrip(&payload, 7), payload);
        assert_eq!(roundtrip(&[], 16), Vec::<u8>::new());
    }

    #[test]
    fn byte_at_a_time_delivery_yields_each_record_once() {
        let mut wire = BytesMut::new();
        encode_record(&mut wire, b"first record", 5);
        encode_record(&mut wire, b"second", 100);
        let mut dec = RecordDecoder::new(1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(rec) = dec.decode(&mut buf).unwrap() {
                got.push(rec.to_vec());
            }
        }
        assert_eq!(got, vec![b"first record".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn oversized_record_is_refused_before_buffering() {
        let mut dec = RecordDecoder::new(1024);
        // A header that claims a 2 GiB fragment fails as soon as the XID
        // after it is in (so that call can be failed), without buffering.
        let mut buf = BytesMut::from(&0xFFFF_FFFFu32.to_be_bytes()[..]);
        assert!(dec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 1 << 20, "no large reservation");
        buf.put_u32(0x1234_5678);
        let err = dec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, RpcError::RecordTooLarge { .. }), "{err}");
        assert_eq!(dec.record_xid(&buf), Some(0x1234_5678));
        assert!(buf.capacity() < 1 << 20, "no large reservation");
        // Many small fragments that add up past the cap fail too.
        let mut dec = RecordDecoder::new(16);
        let mut wire = BytesMut::new();
        for _ in 0..5 {
            wire.put_u32(4);
            wire.put_slice(b"abcd");
        }
        let err = match dec.decode(&mut wire) {
            Ok(Some(_)) => panic!("record over the cap was accepted"),
            Ok(None) => panic!("decoder waited instead of refusing"),
            Err(e) => e,
        };
        assert!(matches!(err, RpcError::RecordTooLarge { len: 20, max: 16 }));
        // An XID split across fragments is put together for the report.
        let mut dec = RecordDecoder::new(16);
        let mut wire = BytesMut::new();
        wire.put_u32(2);
        wire.put_slice(&[0xAB, 0xCD]);
        wire.put_u32(0x7FFF_FFF0);
        assert!(dec.decode(&mut wire).unwrap().is_none());
        wire.put_slice(&[0xEF, 0x01]);
        assert!(dec.decode(&mut wire).is_err());
        assert_eq!(dec.record_xid(&wire), Some(0xABCD_EF01));
    }
}
