//! Decoded NFSv3 (RFC 1813) results.
//!
//! Arguments are encoded with `nfs3_types`; results are decoded here with the
//! bounds-checked [`XdrReader`], because `nfs3_types` trusts wire lengths.
//! Payloads (READ data, names, link targets) are zero-copy slices of the reply.

use bytes::Bytes;
use nfs3_types::nfs3::{nfs_fh3, nfsstat3};
use nfs3_types::xdr_codec::{Opaque, Unpack};

use crate::rpc::xdr::{Decode, XdrError, XdrReader, decode_list};

pub const NFS_PROGRAM: u32 = 100_003;
pub const NFS_VERSION: u32 = 3;
/// RFC 1813 NFS3_FHSIZE.
pub const MAX_FH: usize = 64;
/// Longest name or symlink target we accept in a reply (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// READDIR(PLUS) replies are bounded by their record, but cap entries too.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;

/// An NFSv3 file handle: opaque, at most 64 bytes, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileHandle(Bytes);

impl FileHandle {
    pub fn new(bytes: impl Into<Bytes>) -> Result<Self, XdrError> {
        let b = bytes.into();
        if b.len() > MAX_FH {
            return Err(XdrError::TooLong {
                what: "file handle",
                len: b.len(),
                max: MAX_FH,
            });
        }
        Ok(Self(b))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_nfs(&self) -> nfs_fh3 {
        nfs_fh3 {
            data: Opaque::owned(self.0.to_vec()),
        }
    }
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fh:")?;
        for b in self.0.iter() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Decode for FileHandle {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self(r.opaque("file handle", MAX_FH)?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Regular,
    Directory,
    Block,
    Char,
    Symlink,
    Socket,
    Fifo,
}

impl Decode for FileType {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(match r.u32()? {
            1 => Self::Regular,
            2 => Self::Directory,
            3 => Self::Block,
            4 => Self::Char,
            5 => Self::Symlink,
            6 => Self::Socket,
            7 => Self::Fifo,
            value => {
                return Err(XdrError::BadValue {
                    what: "ftype3",
                    value,
                });
            }
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NfsTime {
    pub seconds: u32,
    pub nseconds: u32,
}

impl NfsTime {
    pub fn to_system_time(self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + std::time::Duration::new(self.seconds as u64, self.nseconds.min(999_999_999))
    }
}

impl Decode for NfsTime {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            seconds: r.u32()?,
            nseconds: r.u32()?,
        })
    }
}

/// `fattr3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fattr {
    pub ftype: FileType,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub used: u64,
    pub rdev: (u32, u32),
    pub fsid: u64,
    pub fileid: u64,
    pub atime: NfsTime,
    pub mtime: NfsTime,
    pub ctime: NfsTime,
}

impl Fattr {
    /// The (size, mtime, ctime) triple that tells whether cached data is
    /// still valid; Linux derives its NFSv3 change attribute the same way.
    pub fn change_key(&self) -> WccAttr {
        WccAttr {
            size: self.size,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }
}

impl Decode for Fattr {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            ftype: FileType::decode(r)?,
            mode: r.u32()?,
            nlink: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            size: r.u64()?,
            used: r.u64()?,
            rdev: (r.u32()?, r.u32()?),
            fsid: r.u64()?,
            fileid: r.u64()?,
            atime: NfsTime::decode(r)?,
            mtime: NfsTime::decode(r)?,
            ctime: NfsTime::decode(r)?,
        })
    }
}

/// `wcc_attr`: the pre-operation attributes that weak cache consistency compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WccAttr {
    pub size: u64,
    pub mtime: NfsTime,
    pub ctime: NfsTime,
}

impl Decode for WccAttr {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            size: r.u64()?,
            mtime: NfsTime::decode(r)?,
            ctime: NfsTime::decode(r)?,
        })
    }
}

/// `post_op_attr`.
pub type PostOpAttr = Option<Fattr>;

/// `wcc_data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wcc {
    pub before: Option<WccAttr>,
    pub after: Option<Fattr>,
}

impl Decode for Wcc {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            before: Option::decode(r)?,
            after: Option::decode(r)?,
        })
    }
}

pub fn decode_status(r: &mut XdrReader) -> Result<nfsstat3, XdrError> {
    let raw = r.u32()?;
    nfsstat3::unpack(&mut &raw.to_be_bytes()[..])
        .map(|(s, _)| s)
        .map_err(|_| XdrError::BadValue {
            what: "nfsstat3",
            value: raw,
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StableHow {
    Unstable,
    DataSync,
    FileSync,
}

impl StableHow {
    pub fn to_nfs(self) -> nfs3_types::nfs3::stable_how {
        use nfs3_types::nfs3::stable_how::*;
        match self {
            Self::Unstable => UNSTABLE,
            Self::DataSync => DATA_SYNC,
            Self::FileSync => FILE_SYNC,
        }
    }
}

impl Decode for StableHow {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(match r.u32()? {
            0 => Self::Unstable,
            1 => Self::DataSync,
            2 => Self::FileSync,
            value => {
                return Err(XdrError::BadValue {
                    what: "stable_how",
                    value,
                });
            }
        })
    }
}

/// The server-instance verifier of WRITE and COMMIT; a change means the
/// server lost uncommitted data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WriteVerf(pub [u8; 8]);

impl Decode for WriteVerf {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self(r.fixed::<8>()?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CookieVerf(pub [u8; 8]);

impl Decode for CookieVerf {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self(r.fixed::<8>()?))
    }
}

macro_rules! decode_struct {
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone)]
        pub struct $name { $(pub $field: $ty),* }
        impl Decode for $name {
            fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
                Ok(Self { $($field: <$ty as Decode>::decode(r)?),* })
            }
        }
    };
}

/// Failure body that carries only `post_op_attr`.
#[derive(Debug, Clone, Default)]
pub struct AttrFail {
    pub attr: PostOpAttr,
}

impl Decode for AttrFail {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            attr: Option::decode(r)?,
        })
    }
}

/// Failure body that carries only one `wcc_data`.
#[derive(Debug, Clone, Default)]
pub struct WccFail {
    pub wcc: Wcc,
}

impl Decode for WccFail {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            wcc: Wcc::decode(r)?,
        })
    }
}

decode_struct!(GetattrOk { attr: Fattr });
decode_struct!(SetattrOk { wcc: Wcc });
decode_struct!(LookupOk {
    fh: FileHandle,
    attr: PostOpAttr,
    dir_attr: PostOpAttr
});
decode_struct!(AccessOk {
    attr: PostOpAttr,
    access: u32
});
decode_struct!(
    /// Result of CREATE, MKDIR, SYMLINK and MKNOD.
    CreatedOk { fh: Option<FileHandle>, attr: PostOpAttr, dir_wcc: Wcc }
);
decode_struct!(
    /// Result of REMOVE and RMDIR.
    RemoveOk { dir_wcc: Wcc }
);
decode_struct!(RenameOk {
    from_wcc: Wcc,
    to_wcc: Wcc
});
decode_struct!(RenameFail {
    from_wcc: Wcc,
    to_wcc: Wcc
});
decode_struct!(LinkOk {
    attr: PostOpAttr,
    dir_wcc: Wcc
});
decode_struct!(LinkFail {
    attr: PostOpAttr,
    dir_wcc: Wcc
});
decode_struct!(WriteOk {
    wcc: Wcc,
    count: u32,
    committed: StableHow,
    verf: WriteVerf
});
decode_struct!(CommitOk {
    wcc: Wcc,
    verf: WriteVerf
});
decode_struct!(FsstatOk {
    attr: PostOpAttr,
    tbytes: u64,
    fbytes: u64,
    abytes: u64,
    tfiles: u64,
    ffiles: u64,
    afiles: u64,
    invarsec: u32,
});
decode_struct!(FsinfoOk {
    attr: PostOpAttr,
    rtmax: u32,
    rtpref: u32,
    rtmult: u32,
    wtmax: u32,
    wtpref: u32,
    wtmult: u32,
    dtpref: u32,
    maxfilesize: u64,
    time_delta: NfsTime,
    properties: u32,
});

#[derive(Debug, Clone)]
pub struct PathconfOk {
    pub attr: PostOpAttr,
    pub linkmax: u32,
    pub name_max: u32,
    pub no_trunc: bool,
    pub chown_restricted: bool,
    pub case_insensitive: bool,
    pub case_preserving: bool,
}

impl Decode for PathconfOk {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            attr: Option::decode(r)?,
            linkmax: r.u32()?,
            name_max: r.u32()?,
            no_trunc: r.bool("no_trunc")?,
            chown_restricted: r.bool("chown_restricted")?,
            case_insensitive: r.bool("case_insensitive")?,
            case_preserving: r.bool("case_preserving")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ReadlinkOk {
    pub attr: PostOpAttr,
    pub target: Bytes,
}

impl Decode for ReadlinkOk {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            attr: Option::decode(r)?,
            target: r.opaque("symlink target", MAX_PATH)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ReadOk {
    pub attr: PostOpAttr,
    pub count: u32,
    pub eof: bool,
    /// Zero-copy slice of the reply record.
    pub data: Bytes,
}

impl Decode for ReadOk {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let attr = Option::decode(r)?;
        let count = r.u32()?;
        let eof = r.bool("eof")?;
        // The data length is bounded by the record, which the transport caps.
        let data = r.opaque("READ data", usize::MAX)?;
        if data.len() != count as usize {
            return Err(XdrError::BadValue {
                what: "READ count (differs from the data length)",
                value: count,
            });
        }
        Ok(Self {
            attr,
            count,
            eof,
            data,
        })
    }
}

fn name(r: &mut XdrReader) -> Result<Bytes, XdrError> {
    r.opaque("file name", MAX_PATH)
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub fileid: u64,
    pub name: Bytes,
    pub cookie: u64,
}

impl Decode for DirEntry {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            fileid: r.u64()?,
            name: name(r)?,
            cookie: r.u64()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DirEntryPlus {
    pub fileid: u64,
    pub name: Bytes,
    pub cookie: u64,
    pub attr: PostOpAttr,
    pub fh: Option<FileHandle>,
}

impl Decode for DirEntryPlus {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            fileid: r.u64()?,
            name: name(r)?,
            cookie: r.u64()?,
            attr: Option::decode(r)?,
            fh: Option::decode(r)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ReaddirOk {
    pub dir_attr: PostOpAttr,
    pub cookieverf: CookieVerf,
    pub entries: Vec<DirEntry>,
    pub eof: bool,
}

impl Decode for ReaddirOk {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            dir_attr: Option::decode(r)?,
            cookieverf: CookieVerf::decode(r)?,
            entries: decode_list(r, "READDIR entries", MAX_DIR_ENTRIES)?,
            eof: r.bool("eof")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ReaddirplusOk {
    pub dir_attr: PostOpAttr,
    pub cookieverf: CookieVerf,
    pub entries: Vec<DirEntryPlus>,
    pub eof: bool,
}

impl Decode for ReaddirplusOk {
    fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(Self {
            dir_attr: Option::decode(r)?,
            cookieverf: CookieVerf::decode(r)?,
            entries: decode_list(r, "READDIRPLUS entries", MAX_DIR_ENTRIES)?,
            eof: r.bool("eof")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfs3_types::nfs3::{READ3resok, fattr3, ftype3, nfstime3, specdata3};
    use nfs3_types::xdr_codec::Pack;

    fn sample_fattr3() -> fattr3 {
        let t = |s| nfstime3 {
            seconds: s,
            nseconds: 7,
        };
        fattr3 {
            type_: ftype3::NF3REG,
            mode: 0o644,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size: 5 << 32,
            used: 4096,
            rdev: specdata3 {
                specdata1: 1,
                specdata2: 2,
            },
            fsid: 99,
            fileid: 12345,
            atime: t(1),
            mtime: t(2),
            ctime: t(3),
        }
    }

    #[test]
    fn decodes_what_nfs3_types_encodes() {
        let res = READ3resok {
            file_attributes: nfs3_types::nfs3::Nfs3Option::Some(sample_fattr3()),
            count: 5,
            eof: true,
            data: Opaque::borrowed(b"hello"),
        };
        let mut buf = Vec::new();
        res.pack(&mut buf).unwrap();
        let ok = ReadOk::decode(&mut XdrReader::new(Bytes::from(buf))).unwrap();
        assert_eq!(&ok.data[..], b"hello");
        assert!(ok.eof);
        let a = ok.attr.unwrap();
        assert_eq!(
            (a.ftype, a.mode, a.size, a.fileid),
            (FileType::Regular, 0o644, 5 << 32, 12345)
        );
        assert_eq!(
            a.ctime,
            NfsTime {
                seconds: 3,
                nseconds: 7
            }
        );
    }

    #[test]
    fn read_count_mismatch_is_an_error() {
        let res = READ3resok {
            file_attributes: nfs3_types::nfs3::Nfs3Option::None,
            count: 6,
            eof: false,
            data: Opaque::borrowed(b"hello"),
        };
        let mut buf = Vec::new();
        res.pack(&mut buf).unwrap();
        assert!(ReadOk::decode(&mut XdrReader::new(Bytes::from(buf))).is_err());
    }

    #[test]
    fn oversized_handle_is_refused() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&65u32.to_be_bytes());
        buf.extend_from_slice(&[0u8; 68]);
        assert!(FileHandle::decode(&mut XdrReader::new(Bytes::from(buf))).is_err());
    }
}
