//! The inode table: FUSE inode numbers ↔ NFS file handles, with lookup counts.
//!
//! Inode numbers are the server's fileids, so they are stable across lookups
//! and remounts; only the export root is renumbered to FUSE's root (1), and a
//! file whose fileid is 1 takes the root's fileid in exchange.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::nfs::{Fattr, FileHandle, FileType, WccAttr};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone)]
pub struct Inode {
    pub fh: FileHandle,
    pub attr: Fattr,
    /// When the cached attributes stop being trusted.
    pub expires: Instant,
    /// Current attribute timeout; grows while the file stays unchanged.
    pub timeout: Duration,
    /// Kernel lookup references (FUSE lookup/forget).
    pub nlookup: u64,
    /// Bumped when the same fileid comes back with another handle (the file
    /// was replaced on the server), so the kernel drops stale dentries.
    pub generation: u64,
    pub open_count: u32,
    /// Set when the file was unlinked while open and renamed to a `.nfs` name.
    pub silly: Option<(u64, Bytes)>,
    /// The (size, mtime, ctime) the cached file data belongs to.
    pub data_key: Option<WccAttr>,
    /// Generation of this file's blocks in the page cache; bumping it drops
    /// them all. Unique across inodes and lifetimes.
    pub cache_gen: u64,
}

static NEXT_CACHE_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn next_cache_gen() -> u64 {
    NEXT_CACHE_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Attribute-cache timing from acregmin/acregmax/acdirmin/acdirmax.
#[derive(Debug, Clone, Copy)]
pub struct AttrTimeouts {
    pub regmin: Duration,
    pub regmax: Duration,
    pub dirmin: Duration,
    pub dirmax: Duration,
}

impl AttrTimeouts {
    pub fn bounds(&self, ftype: FileType) -> (Duration, Duration) {
        if ftype == FileType::Directory {
            (self.dirmin, self.dirmax)
        } else {
            (self.regmin, self.regmax)
        }
    }
}

pub struct InodeTable {
    root_fileid: u64,
    map: Mutex<HashMap<u64, Inode>>,
    timeouts: AttrTimeouts,
}

impl InodeTable {
    pub fn new(root_fh: FileHandle, root_attr: Fattr, timeouts: AttrTimeouts) -> Self {
        let t = Self {
            root_fileid: root_attr.fileid,
            map: Mutex::new(HashMap::new()),
            timeouts,
        };
        let (min, _) = timeouts.bounds(root_attr.ftype);
        t.map.lock().insert(
            ROOT_INO,
            Inode {
                fh: root_fh,
                attr: root_attr,
                expires: Instant::now() + min,
                timeout: min,
                nlookup: 1,
                generation: 0,
                open_count: 0,
                silly: None,
                data_key: None,
                cache_gen: next_cache_gen(),
            },
        );
        t
    }

    pub fn ino_of(&self, fileid: u64) -> u64 {
        if fileid == self.root_fileid {
            ROOT_INO
        } else if fileid == ROOT_INO {
            self.root_fileid
        } else {
            fileid
        }
    }

    pub fn get(&self, ino: u64) -> Option<Inode> {
        self.map.lock().get(&ino).cloned()
    }

    pub fn fh(&self, ino: u64) -> Option<FileHandle> {
        self.map.lock().get(&ino).map(|i| i.fh.clone())
    }

    pub fn with<R>(&self, ino: u64, f: impl FnOnce(&mut Inode) -> R) -> Option<R> {
        self.map.lock().get_mut(&ino).map(f)
    }

    /// Records a (handle, attributes) pair seen in a reply and returns its
    /// inode number and generation; `lookups` is added to the kernel's count.
    pub fn remember(&self, fh: &FileHandle, attr: &Fattr, lookups: u64) -> (u64, u64) {
        let ino = self.ino_of(attr.fileid);
        let mut map = self.map.lock();
        let (min, _) = self.timeouts.bounds(attr.ftype);
        let now = Instant::now();
        match map.get_mut(&ino) {
            Some(i) => {
                if i.fh != *fh {
                    i.fh = fh.clone();
                    i.generation += 1;
                    i.data_key = None;
                    i.cache_gen = next_cache_gen();
                    Self::refresh(i, attr, now, self.timeouts);
                } else if attr.ctime >= i.attr.ctime {
                    Self::refresh(i, attr, now, self.timeouts);
                }
                i.nlookup += lookups;
                (ino, i.generation)
            }
            None => {
                map.insert(
                    ino,
                    Inode {
                        fh: fh.clone(),
                        attr: *attr,
                        expires: now + min,
                        timeout: min,
                        nlookup: lookups,
                        generation: 0,
                        open_count: 0,
                        silly: None,
                        data_key: None,
                        cache_gen: next_cache_gen(),
                    },
                );
                (ino, 0)
            }
        }
    }

    /// Updates cached attributes from a reply's post-operation attributes.
    /// Replies can be processed out of order (a COMMIT answered before a
    /// truncate but handled after it), so attributes older than the cached
    /// ones, by ctime, are ignored rather than allowed to roll the file back.
    pub fn update_attr(&self, ino: u64, attr: &Fattr) {
        if let Some(i) = self.map.lock().get_mut(&ino)
            && attr.ctime >= i.attr.ctime
        {
            Self::refresh(i, attr, Instant::now(), self.timeouts);
        }
    }

    /// Replaces cached attributes with ones just fetched by GETATTR, which
    /// are authoritative even if the server's clock went backwards.
    pub fn set_attr(&self, ino: u64, attr: &Fattr) {
        if let Some(i) = self.map.lock().get_mut(&ino) {
            Self::refresh(i, attr, Instant::now(), self.timeouts);
        }
    }

    fn refresh(i: &mut Inode, attr: &Fattr, now: Instant, t: AttrTimeouts) {
        let (min, max) = t.bounds(attr.ftype);
        i.timeout = if i.attr.change_key() == attr.change_key() {
            (i.timeout * 2).clamp(min, max)
        } else {
            min
        };
        i.attr = *attr;
        i.expires = now + i.timeout;
    }

    /// Installs a new handle for the export root (after the export was
    /// re-created on the server), keeping inode number 1.
    pub fn replace_root(&self, fh: &FileHandle, attr: &Fattr) {
        if let Some(i) = self.map.lock().get_mut(&ROOT_INO) {
            i.fh = fh.clone();
            i.attr = *attr;
            i.generation += 1;
            i.cache_gen = next_cache_gen();
            i.data_key = None;
            i.expires = Instant::now() + i.timeout;
        }
    }

    /// Drops every cached block of `ino` (the data changed under us).
    pub fn invalidate_data(&self, ino: u64) {
        if let Some(i) = self.map.lock().get_mut(&ino) {
            i.cache_gen = next_cache_gen();
            i.data_key = None;
        }
    }

    /// Marks cached attributes stale so the next getattr asks the server.
    pub fn invalidate_attr(&self, ino: u64) {
        if let Some(i) = self.map.lock().get_mut(&ino) {
            i.expires = Instant::now();
        }
    }

    /// Drops `n` kernel references; forgets the inode once nothing holds it.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut map = self.map.lock();
        if let Some(i) = map.get_mut(&ino) {
            i.nlookup = i.nlookup.saturating_sub(n);
            if i.nlookup == 0 && i.open_count == 0 {
                map.remove(&ino);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn timeouts(&self) -> AttrTimeouts {
        self.timeouts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::NfsTime;

    fn attr(fileid: u64, mtime: u32) -> Fattr {
        Fattr {
            ftype: FileType::Regular,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size: 0,
            used: 0,
            rdev: (0, 0),
            fsid: 1,
            fileid,
            atime: NfsTime::default(),
            mtime: NfsTime {
                seconds: mtime,
                nseconds: 0,
            },
            ctime: NfsTime::default(),
        }
    }

    fn fh(b: u8) -> FileHandle {
        FileHandle::new(vec![b; 8]).unwrap()
    }

    fn timeouts() -> AttrTimeouts {
        AttrTimeouts {
            regmin: Duration::from_secs(3),
            regmax: Duration::from_secs(60),
            dirmin: Duration::from_secs(30),
            dirmax: Duration::from_secs(60),
        }
    }

    #[test]
    fn root_and_fileid_one_swap_numbers() {
        let mut root = attr(500, 0);
        root.ftype = FileType::Directory;
        let t = InodeTable::new(fh(0), root, timeouts());
        assert_eq!(t.ino_of(500), ROOT_INO);
        assert_eq!(t.ino_of(1), 500);
        assert_eq!(t.ino_of(77), 77);
    }

    #[test]
    fn lookup_counts_and_replaced_handles() {
        let mut root = attr(2, 0);
        root.ftype = FileType::Directory;
        let t = InodeTable::new(fh(0), root, timeouts());
        let (ino, gen0) = t.remember(&fh(1), &attr(10, 1), 1);
        t.remember(&fh(1), &attr(10, 1), 1);
        assert_eq!(t.get(ino).unwrap().nlookup, 2);
        let (_, gen1) = t.remember(&fh(9), &attr(10, 1), 0);
        assert_eq!(
            gen1,
            gen0 + 1,
            "a new handle for the same fileid bumps the generation"
        );
        t.forget(ino, 1);
        assert!(t.get(ino).is_some());
        t.forget(ino, 1);
        assert!(t.get(ino).is_none());
    }

    #[test]
    fn attribute_timeout_grows_while_unchanged_and_resets_on_change() {
        let mut root = attr(2, 0);
        root.ftype = FileType::Directory;
        let t = InodeTable::new(fh(0), root, timeouts());
        let (ino, _) = t.remember(&fh(1), &attr(10, 1), 1);
        assert_eq!(t.get(ino).unwrap().timeout, Duration::from_secs(3));
        t.update_attr(ino, &attr(10, 1));
        t.update_attr(ino, &attr(10, 1));
        assert_eq!(t.get(ino).unwrap().timeout, Duration::from_secs(12));
        t.update_attr(ino, &attr(10, 2));
        assert_eq!(t.get(ino).unwrap().timeout, Duration::from_secs(3));
    }

    #[test]
    fn older_post_op_attributes_do_not_roll_back_newer_ones() {
        let mut root = attr(2, 0);
        root.ftype = FileType::Directory;
        let t = InodeTable::new(fh(0), root, timeouts());
        let at = |size: u64, ctime: u32| Fattr {
            size,
            ctime: NfsTime {
                seconds: ctime,
                nseconds: 0,
            },
            ..attr(10, 1)
        };
        let (ino, _) = t.remember(&fh(1), &at(100, 5), 1);
        t.update_attr(ino, &at(200, 7));
        t.update_attr(ino, &at(150, 6)); // a late reply from before the truncate
        assert_eq!(t.get(ino).unwrap().attr.size, 200);
        t.set_attr(ino, &at(50, 1)); // GETATTR is authoritative
        assert_eq!(t.get(ino).unwrap().attr.size, 50);
    }
}
