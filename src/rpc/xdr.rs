//! A bounds-checked XDR reader over a received record.
//!
//! `nfs3_types` allocates `vec![0; len]` with a length taken from the wire
//! before checking that the bytes exist, so we never hand it untrusted input.
//! This reader checks every length against what is left of the record (and an
//! explicit maximum) first, and returns variable-length data as zero-copy
//! slices of the record.

use bytes::Bytes;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XdrError {
    #[error("reply truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid value {value} for {what}")]
    BadValue { what: &'static str, value: u32 },
}

pub struct XdrReader {
    buf: Bytes,
    pos: usize,
}

impl XdrReader {
    pub fn new(buf: Bytes) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], XdrError> {
        if self.remaining() < n {
            return Err(XdrError::Truncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u32(&mut self) -> Result<u32, XdrError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, XdrError> {
        let hi = self.u32()? as u64;
        let lo = self.u32()? as u64;
        Ok(hi << 32 | lo)
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(XdrError::BadValue { what, value }),
        }
    }

    /// Fixed-length opaque of `N` bytes (plus padding).
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], XdrError> {
        let padded = (N + 3) & !3;
        let b = self.take(padded)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b[..N]);
        Ok(out)
    }

    /// Variable-length opaque, refused if longer than `max` or than what is left.
    pub fn opaque(&mut self, what: &'static str, max: usize) -> Result<Bytes, XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        let padded = len.checked_add(3).ok_or(XdrError::TooLong {
            what,
            len,
            max: usize::MAX - 3,
        })? & !3;
        if self.remaining() < padded {
            return Err(XdrError::Truncated {
                offset: self.pos,
                needed: padded - self.remaining(),
            });
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += padded;
        Ok(out)
    }

    /// What is left of the record, without copying.
    pub fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

/// Types that can be decoded from a reply with [`XdrReader`].
pub trait Decode: Sized {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError>;
}

impl Decode for u32 {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        r.u32()
    }
}

impl Decode for u64 {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        r.u64()
    }
}

impl Decode for () {
    fn decode(_: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(())
    }
}

impl<T: Decode> Decode for Option<T> {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        if r.bool("optional-data discriminant")? {
            Ok(Some(T::decode(r)?))
        } else {
            Ok(None)
        }
    }
}

/// Decodes an XDR linked list (`*next` chain), refusing more than `max` items.
pub fn decode_list<T: Decode>(
    r: &mut XdrReader,
    what: &'static str,
    max: usize,
) -> Result<Vec<T>, XdrError> {
    let mut out = Vec::new();
    while r.bool(what)? {
        if out.len() == max {
            return Err(XdrError::TooLong {
                what,
                len: max + 1,
                max,
            });
        }
        out.push(T::decode(r)?);
    }
    Ok(out)
}

/// Decodes an XDR counted array of `u32`, refusing more than `max` items.
pub fn decode_u32_array(
    r: &mut XdrReader,
    what: &'static str,
    max: usize,
) -> Result<Vec<u32>, XdrError> {
    let len = r.u32()? as usize;
    if len > max {
        return Err(XdrError::TooLong { what, len, max });
    }
    (0..len).map(|_| r.u32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_claiming_4gib_fails_without_allocating() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&0xFFFF_FFFFu32.to_be_bytes());
        wire.extend_from_slice(b"tiny");
        let mut r = XdrReader::new(Bytes::from(wire));
        let err = r.opaque("data", usize::MAX).unwrap_err();
        assert!(matches!(err, XdrError::Truncated { .. }), "{err:?}");
        let mut r = XdrReader::new(Bytes::from_static(&[0, 0, 0, 65, 0]));
        assert_eq!(
            r.opaque("fh", 64).unwrap_err(),
            XdrError::TooLong {
                what: "fh",
                len: 65,
                max: 64
            }
        );
    }

    #[test]
    fn opaque_is_padded_and_zero_copy() {
        let wire = Bytes::from_static(&[0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 7]);
        let mut r = XdrReader::new(wire.clone());
        let o = r.opaque("x", 10).unwrap();
        assert_eq!(&o[..], b"abc");
        assert_eq!(o.as_ptr(), wire[4..].as_ptr());
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn bool_and_list_limits() {
        let mut r = XdrReader::new(Bytes::from_static(&[0, 0, 0, 2]));
        assert!(matches!(
            r.bool("b"),
            Err(XdrError::BadValue { value: 2, .. })
        ));
        let mut wire = Vec::new();
        for i in 0..3u32 {
            wire.extend_from_slice(&1u32.to_be_bytes());
            wire.extend_from_slice(&i.to_be_bytes());
        }
        wire.extend_from_slice(&0u32.to_be_bytes());
        let bytes = Bytes::from(wire);
        let got: Vec<u32> = decode_list(&mut XdrReader::new(bytes.clone()), "l", 3).unwrap();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(decode_list::<u32>(&mut XdrReader::new(bytes), "l", 2).is_err());
    }
}
