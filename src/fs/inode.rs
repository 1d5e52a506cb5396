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
use crate::rpc::Credential;

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
    /// Set when the file was unlinked while open and renamed to a `.nfs`
    /// name: the directory, that name, and the unlinker's identity, which
    /// the last close's REMOVE uses (RELEASE comes without the caller's).
    pub silly: Option<(u64, Bytes, Credential)>,
    /// The (size, mtime, ctime) the cached file data belongs to.
    pub data_key: Option<WccAttr>,
    /// Generation of this file's blocks in the page cache; bumping it drops
    /// them all. Unique across inodes and lifetimes.
    pub cache_gen: u64,
    /// Stamp of the newest reply whose attributes we took (see [`Observed`]).
    pub attr_stamp: u64,
}

/// Where a set of attributes came from, so racing replies cannot roll a file
/// back. ctime alone cannot order them: on a server with coarse timestamps a
/// truncate and the write after it share one ctime, and a READDIRPLUS sent
/// before our WRITE landed would shrink the file back to 0 (the kernel client
/// orders replies the same way, by its attribute generation counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The reply to a call of ours that changed the object: the state right
    /// after our change. Calls sent before it completed may predate it.
    Changed,
    /// A reply to a call sent at this [`InodeTable::stamp`]; it may reflect
    /// the state before a change of ours that completed while it was out.
    Since(u64),
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
    /// The export root's fileid, which trades inode numbers with ROOT_INO;
    /// a new one when the root is replaced (the export was recreated).
    root_fileid: std::sync::atomic::AtomicU64,
    map: Mutex<HashMap<u64, Inode>>,
    timeouts: AttrTimeouts,
    clock: std::sync::atomic::AtomicU64,
}

impl InodeTable {
    pub fn new(root_fh: FileHandle, root_attr: Fattr, timeouts: AttrTimeouts) -> Self {
        let t = Self {
            root_fileid: std::sync::atomic::AtomicU64::new(root_attr.fileid),
            map: Mutex::new(HashMap::new()),
            timeouts,
            clock: std::sync::atomic::AtomicU64::new(1),
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
                attr_stamp: 0,
            },
        );
        t
    }

    /// Takes a stamp to tag a call with before sending it: replies are
    /// ordered by when their call went out (see [`Observed`]).
    pub fn stamp(&self) -> u64 {
        self.clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn stamp_of(&self, seen: Observed) -> u64 {
        match seen {
            Observed::Changed => self.stamp(),
            Observed::Since(t) => t,
        }
    }

    /// Whether attributes seen as `seen` may replace the cached ones, and
    /// the stamp to record if so. A call sent after the cached attributes'
    /// call (or after our last change completed) reflects a later state;
    /// otherwise only a strictly newer ctime proves it is not stale.
    fn accept(&self, i: &Inode, attr: &Fattr, seen: Observed) -> Option<u64> {
        match seen {
            Observed::Changed => (attr.ctime >= i.attr.ctime).then(|| self.stamp()),
            Observed::Since(t) => {
                (t > i.attr_stamp || attr.ctime > i.attr.ctime).then_some(t.max(i.attr_stamp))
            }
        }
    }

    pub fn ino_of(&self, fileid: u64) -> u64 {
        let root_fileid = self.root_fileid.load(std::sync::atomic::Ordering::Relaxed);
        if fileid == root_fileid {
            ROOT_INO
        } else if fileid == ROOT_INO {
            root_fileid
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
    pub fn remember(
        &self,
        fh: &FileHandle,
        attr: &Fattr,
        lookups: u64,
        seen: Observed,
    ) -> (u64, u64) {
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
                    i.attr_stamp = self.stamp_of(seen);
                    Self::refresh(i, attr, now, self.timeouts);
                } else if let Some(t) = self.accept(i, attr, seen) {
                    i.attr_stamp = t;
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
                        attr_stamp: self.stamp_of(seen),
                    },
                );
                (ino, 0)
            }
        }
    }

    /// Updates cached attributes from a reply, unless they are older than
    /// the cached ones (replies are handled out of order: a READDIRPLUS sent
    /// before our WRITE can be answered after it). See [`Observed`].
    pub fn update_attr(&self, ino: u64, attr: &Fattr, seen: Observed) {
        let mut map = self.map.lock();
        if let Some(i) = map.get_mut(&ino)
            && let Some(t) = self.accept(i, attr, seen)
        {
            i.attr_stamp = t;
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
        let mut map = self.map.lock();
        // The new root's fileid is ROOT_INO from now on, so a listing of the
        // new root does not hand its "." to the kernel as another inode.
        self.root_fileid
            .store(attr.fileid, std::sync::atomic::Ordering::Relaxed);
        if let Some(i) = map.get_mut(&ROOT_INO) {
            i.fh = fh.clone();
            i.attr = *attr;
            i.generation += 1;
            i.cache_gen = next_cache_gen();
            i.data_key = None;
            i.attr_stamp = self.stamp();
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
        let (ino, gen0) = t.remember(&fh(1), &attr(10, 1), 1, Observed::Changed);
        t.remember(&fh(1), &attr(10, 1), 1, Observed::Changed);
        assert_eq!(t.get(ino).unwrap().nlookup, 2);
        let (_, gen1) = t.remember(&fh(9), &attr(10, 1), 0, Observed::Changed);
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
        let (ino, _) = t.remember(&fh(1), &attr(10, 1), 1, Observed::Changed);
        assert_eq!(t.get(ino).unwrap().timeout, Duration::from_secs(3));
        t.update_attr(ino, &attr(10, 1), Observed::Since(t.stamp()));
        t.update_attr(ino, &attr(10, 1), Observed::Since(t.stamp()));
        assert_eq!(t.get(ino).unwrap().timeout, Duration::from_secs(12));
        t.update_attr(ino, &attr(10, 2), Observed::Since(t.stamp()));
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
        let (ino, _) = t.remember(&fh(1), &at(100, 5), 1, Observed::Changed);
        let early = t.stamp();
        t.update_attr(ino, &at(200, 7), Observed::Changed);
        // A late reply from before the truncate, by ctime…
        t.update_attr(ino, &at(150, 6), Observed::Changed);
        assert_eq!(t.get(ino).unwrap().attr.size, 200);
        // …or, with the same ctime, by when its call was sent.
        t.update_attr(ino, &at(0, 7), Observed::Since(early));
        t.remember(&fh(1), &at(0, 7), 0, Observed::Since(early));
        assert_eq!(t.get(ino).unwrap().attr.size, 200);
        // A call sent after our change completed is believed, even if the
        // server's clock went backwards.
        t.update_attr(ino, &at(50, 1), Observed::Since(t.stamp()));
        assert_eq!(t.get(ino).unwrap().attr.size, 50);
        // Among lookups, the later call wins whatever order replies arrive in.
        let (a, b) = (t.stamp(), t.stamp());
        t.update_attr(ino, &at(60, 1), Observed::Since(b));
        t.update_attr(ino, &at(40, 1), Observed::Since(a));
        assert_eq!(t.get(ino).unwrap().attr.size, 60);
    }
}
