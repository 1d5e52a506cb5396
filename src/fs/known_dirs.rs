//! Directories whose every name we know, so a lookup of any other name is
//! answered "no such file" without a LOOKUP.
//!
//! A directory we made ourselves starts out empty, and each of our own
//! creates and removes in it reports the directory's attributes before and
//! after the change (wcc_data). While each "before" matches the "after" we
//! last saw, nobody else has touched the directory, so our list of names is
//! the whole truth. This is what makes `tar -x` and `for i in ...; do : > f$i`
//! cost one RPC per create instead of two: the kernel's LOOKUP of the new
//! name, sent before every create, is answered here.
//!
//! A server whose timestamps are too coarse to move on every change (two
//! creates in one tick) gives no such proof, and gets no such trust.
//!
//! What a wcc chain cannot see is another client's change in the very tick
//! of one of ours, on a server whose clock ticks coarsely. So trust is kept
//! short: it lapses (and is dropped, never revived) when our changes pause
//! for longer than a negative lookup entry lives, and ends [`MAX_TRUST`]
//! after the MKDIR however busy we are; a READDIR showing a name we did not
//! know ends it at once. Servers whose names are not compared byte for byte
//! (case-insensitive, truncating) never get it (the caller checks PATHCONF),
//! and names that filers conjure in every directory are never "absent".

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::nfs::{Wcc, WccAttr};

/// Names kept for one directory; a bigger directory is forgotten (its
/// lookups go to the server), which bounds memory.
const MAX_NAMES_PER_DIR: usize = 65_536;
/// Names kept over all directories.
const MAX_NAMES: usize = 262_144;
/// Longest a directory's listing is trusted after we made it.
pub const MAX_TRUST: Duration = Duration::from_secs(30);
/// Snapshot directories some servers answer LOOKUP for in every directory
/// without listing them (NetApp, Isilon, ZFS).
const CONJURED: [&[u8]; 4] = [b".snapshot", b".isi-snapshot", b".zfs", b"~snapshot"];

/// One change of ours to a directory's entries.
#[derive(Debug, Clone, Copy)]
pub enum DirChange<'a> {
    Added(&'a [u8]),
    Removed(&'a [u8]),
}

struct Listing {
    /// The directory's (size, mtime, ctime) when the names were last known
    /// to be complete.
    key: WccAttr,
    names: HashSet<Bytes>,
    /// When the server last confirmed it (our own change's wcc_data).
    confirmed: Instant,
    made: Instant,
}

impl Listing {
    fn trusted(&self, ttl: Duration) -> bool {
        self.confirmed.elapsed() < ttl && self.made.elapsed() < MAX_TRUST
    }
}

pub struct KnownDirs {
    dirs: lru::LruCache<u64, Listing>,
    names: usize,
}

impl Default for KnownDirs {
    fn default() -> Self {
        Self::new()
    }
}

impl KnownDirs {
    pub fn new() -> Self {
        Self {
            dirs: lru::LruCache::new(NonZeroUsize::new(4096).unwrap()),
            names: 0,
        }
    }

    /// `dir` was just made by us and is empty; `key` is from the MKDIR reply
    /// itself (attributes fetched later could include someone else's create).
    pub fn made_empty(&mut self, dir: u64, key: WccAttr) {
        self.forget(dir);
        let now = Instant::now();
        let listing = Listing {
            key,
            names: HashSet::new(),
            confirmed: now,
            made: now,
        };
        if let Some((_, evicted)) = self.dirs.push(dir, listing) {
            self.names = self.names.saturating_sub(evicted.names.len());
        }
    }

    /// Applies our own `changes` to `dir`, reported with `wcc`. A "before"
    /// other than the state we knew means someone else changed the
    /// directory too, or replies crossed: the directory is forgotten.
    pub fn changed(&mut self, dir: u64, wcc: &Wcc, changes: &[DirChange], ttl: Duration) {
        let Some(l) = self.dirs.get_mut(&dir) else {
            return;
        };
        if !l.trusted(ttl) {
            self.forget(dir);
            return;
        }
        let (Some(before), Some(after)) = (wcc.before, wcc.after) else {
            self.forget(dir);
            return;
        };
        // A change that did not move mtime means the server's clock is too
        // coarse to show someone else's change beside ours: trust nothing.
        if before != l.key || after.mtime == before.mtime {
            self.forget(dir);
            return;
        }
        let mut delta = 0isize;
        for c in changes {
            match *c {
                DirChange::Added(n) => delta += l.names.insert(Bytes::copy_from_slice(n)) as isize,
                DirChange::Removed(n) => delta -= l.names.remove(n) as isize,
            }
        }
        l.key = after.change_key();
        l.confirmed = Instant::now();
        let len = l.names.len();
        self.names = self.names.saturating_add_signed(delta);
        if len > MAX_NAMES_PER_DIR {
            self.forget(dir);
        }
        while self.names > MAX_NAMES {
            match self.dirs.pop_lru() {
                Some((_, l)) => self.names = self.names.saturating_sub(l.names.len()),
                None => break,
            }
        }
    }

    /// Whether `name` is known to be absent from `dir`, whose cached
    /// attributes are `current` (fresh, per the caller).
    pub fn absent(&mut self, dir: u64, current: WccAttr, name: &[u8], ttl: Duration) -> bool {
        if name == b"." || name == b".." || CONJURED.contains(&name) {
            return false;
        }
        match self.dirs.get(&dir) {
            Some(l) if !l.trusted(ttl) => {
                self.forget(dir);
                false
            }
            Some(l) => l.key == current && !l.names.contains(name),
            None => false,
        }
    }

    /// A READDIR of `dir` returned `name`: if we did not know it, our list
    /// was wrong and is dropped.
    pub fn listed(&mut self, dir: u64, name: &[u8]) {
        if name == b"." || name == b".." {
            return;
        }
        if self
            .dirs
            .peek(&dir)
            .is_some_and(|l| !l.names.contains(name))
        {
            self.forget(dir);
        }
    }

    pub fn forget(&mut self, dir: u64) {
        if let Some(l) = self.dirs.pop(&dir) {
            self.names = self.names.saturating_sub(l.names.len());
        }
    }

    /// Names held over all directories.
    pub fn len(&self) -> usize {
        self.names
    }

    pub fn is_empty(&self) -> bool {
        self.names == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::{Fattr, FileType, NfsTime};

    fn key(t: u32) -> WccAttr {
        WccAttr {
            size: 4096,
            mtime: NfsTime {
                seconds: t,
                nseconds: 0,
            },
            ctime: NfsTime {
                seconds: t,
                nseconds: 0,
            },
        }
    }

    fn wcc(before: u32, after: u32) -> Wcc {
        let k = key(after);
        let attr = Fattr {
            ftype: FileType::Directory,
            mode: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: k.size,
            used: 0,
            rdev: (0, 0),
            fsid: 1,
            fileid: 5,
            atime: NfsTime::default(),
            mtime: k.mtime,
            ctime: k.ctime,
        };
        Wcc {
            before: Some(key(before)),
            after: Some(attr),
        }
    }

    const TTL: Duration = Duration::from_secs(1);

    #[test]
    fn our_own_changes_keep_the_listing_complete() {
        let mut k = KnownDirs::new();
        k.made_empty(5, key(1));
        assert!(k.absent(5, key(1), b"a", TTL));
        k.changed(5, &wcc(1, 2), &[DirChange::Added(b"a")], TTL);
        assert!(!k.absent(5, key(2), b"a", TTL), "a was created");
        assert!(k.absent(5, key(2), b"b", TTL));
        k.changed(5, &wcc(2, 3), &[DirChange::Removed(b"a")], TTL);
        assert!(k.absent(5, key(3), b"a", TTL), "a was removed");
        assert_eq!(k.len(), 0);
        assert!(!k.absent(5, key(3), b"..", TTL));
        assert!(!k.absent(5, key(3), b".snapshot", TTL));
        k.listed(5, b"b");
        assert!(
            !k.absent(5, key(3), b"c", TTL),
            "READDIR showed a name we did not know"
        );
    }

    #[test]
    fn lapsed_trust_is_not_revived() {
        let mut k = KnownDirs::new();
        k.made_empty(5, key(1));
        assert!(!k.absent(5, key(1), b"a", Duration::ZERO));
        // Our next change chains on, but the listing is gone for good.
        k.changed(5, &wcc(1, 2), &[DirChange::Added(b"b")], TTL);
        assert!(!k.absent(5, key(2), b"a", TTL));
    }

    #[test]
    fn evicted_directories_give_back_their_names() {
        let mut k = KnownDirs::new();
        for d in 0..5000u64 {
            k.made_empty(d, key(1));
            k.changed(d, &wcc(1, 2), &[DirChange::Added(b"x")], TTL);
        }
        assert_eq!(k.len(), 4096, "one name per directory still held");
    }

    #[test]
    fn someone_elses_change_or_stale_attributes_end_the_knowledge() {
        let mut k = KnownDirs::new();
        k.made_empty(5, key(1));
        assert!(!k.absent(5, key(9), b"a", TTL), "directory changed since");
        // Our create reports a "before" we did not know: another client was here.
        k.changed(5, &wcc(7, 8), &[DirChange::Added(b"a")], TTL);
        assert!(!k.absent(5, key(8), b"b", TTL));
        k.made_empty(6, key(1));
        k.changed(
            6,
            &Wcc {
                before: None,
                after: None,
            },
            &[],
            TTL,
        );
        assert!(!k.absent(6, key(1), b"b", TTL), "no wcc: cannot tell");
        k.made_empty(7, key(1));
        assert!(
            !k.absent(7, key(1), b"b", Duration::ZERO),
            "trusted only for the TTL"
        );
        k.changed(7, &wcc(1, 1), &[DirChange::Added(b"a")], TTL);
        assert!(
            !k.absent(7, key(1), b"b", TTL),
            "mtime did not move: too coarse"
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut k = KnownDirs::new();
        k.made_empty(1, key(0));
        for i in 0..=MAX_NAMES_PER_DIR as u32 {
            k.changed(
                1,
                &wcc(i, i + 1),
                &[DirChange::Added(format!("f{i}").as_bytes())],
                TTL,
            );
        }
        assert_eq!(k.len(), 0, "an over-large directory is forgotten");
        assert!(!k.absent(1, key(MAX_NAMES_PER_DIR as u32 + 1), b"x", TTL));
    }
}
