//! A memory-bounded, shared LRU of file blocks for one mount.
//!
//! Blocks are `block` bytes (the READ transfer size) at aligned offsets; the
//! last block of a file may be shorter. Keys carry a per-inode cache
//! generation, so invalidating a whole file is a counter bump and its old
//! blocks simply age out. Concurrent readers of a block that is being
//! fetched share one READ.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::Shared;
use parking_lot::Mutex;

use super::errno::FsError;

/// (cache generation, block index). Generations are unique across inodes
/// and inode lifetimes, so the inode number need not be part of the key.
pub type BlockKey = (u64, u64);

type Fetch = Shared<Pin<Box<dyn Future<Output = Result<Bytes, FsError>> + Send>>>;

struct Inner {
    lru: lru::LruCache<BlockKey, Bytes>,
    bytes: usize,
    /// Fetches in flight, each with its own id: an invalidated fetch that
    /// finishes after a new one for the same block started must not take
    /// the new one's place (and cache its old data).
    inflight: HashMap<BlockKey, (u64, Fetch)>,
    next_fetch: u64,
}

impl Inner {
    /// Evicts least-recently-used blocks until `extra` more bytes (plus one
    /// block for every fetch in flight) fit in `capacity`: what is being
    /// read ahead counts against the bound before it lands.
    fn make_room(&mut self, capacity: usize, block: usize, extra: usize) {
        let reserved = self.inflight.len() * block;
        while self.bytes + reserved + extra > capacity {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

pub struct PageCache {
    block: u64,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: usize,
    pub blocks: usize,
    pub inflight: usize,
}

impl PageCache {
    pub fn new(block: u32, capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            block: block as u64,
            capacity: capacity.max(block as u64 * 2) as usize,
            inner: Mutex::new(Inner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
                next_fetch: 0,
            }),
        })
    }

    pub fn block_size(&self) -> u64 {
        self.block
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get(&self, key: BlockKey) -> Option<Bytes> {
        self.inner.lock().lru.get(&key).cloned()
    }

    pub fn contains(&self, key: BlockKey) -> bool {
        let g = self.inner.lock();
        g.lru.contains(&key) || g.inflight.contains_key(&key)
    }

    pub fn insert(&self, key: BlockKey, data: Bytes) {
        let mut g = self.inner.lock();
        if let Some(old) = g.lru.pop(&key) {
            g.bytes -= old.len();
        }
        g.make_room(self.capacity, self.block as usize, data.len());
        g.bytes += data.len();
        g.lru.put(key, data);
    }

    /// Drops the blocks of generation `cgen` that overlap [start, end).
    pub fn invalidate_range(&self, cgen: u64, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let mut g = self.inner.lock();
        for idx in start / self.block..=(end - 1) / self.block {
            if let Some(old) = g.lru.pop(&(cgen, idx)) {
                g.bytes -= old.len();
            }
            g.inflight.remove(&(cgen, idx));
        }
    }

    /// For a write at `offset` past `size`, the file's end: drops the block
    /// that held the old end, which is short and would read as the end of
    /// the file (the blocks between are not cached: they were past the end).
    pub fn invalidate_end(&self, cgen: u64, size: u64, offset: u64) {
        if offset > size {
            let last = size / self.block * self.block;
            self.invalidate_range(cgen, last, last + 1);
        }
    }

    /// Returns the block, fetching it with `fetch` unless it is cached or
    /// already being fetched. The fetch runs in its own task, so it completes
    /// (and fills the cache) even if this caller goes away.
    pub async fn get_or_fetch<F>(
        self: &Arc<Self>,
        key: BlockKey,
        fetch: F,
    ) -> Result<Bytes, FsError>
    where
        F: Future<Output = Result<Bytes, FsError>> + Send + 'static,
    {
        let shared = {
            let mut g = self.inner.lock();
            if let Some(b) = g.lru.get(&key) {
                return Ok(b.clone());
            }
            match g.inflight.get(&key) {
                Some((_, f)) => f.clone(),
                None => {
                    g.make_room(self.capacity, self.block as usize, self.block as usize);
                    self.start_fetch(&mut g, key, fetch)
                }
            }
        };
        shared.await
    }

    /// Starts fetching a block in the background if it is neither cached nor
    /// in flight (readahead).
    pub fn prefetch<F>(self: &Arc<Self>, key: BlockKey, fetch: F)
    where
        F: Future<Output = Result<Bytes, FsError>> + Send + 'static,
    {
        let mut g = self.inner.lock();
        if g.lru.contains(&key) || g.inflight.contains_key(&key) {
            return;
        }
        // Readahead never pushes the cache past its bound: skip it if even
        // evicting everything would not make room.
        if (g.inflight.len() + 1) * self.block as usize > self.capacity {
            return;
        }
        g.make_room(self.capacity, self.block as usize, self.block as usize);
        // The fetch runs in its own task and fills the cache by itself.
        drop(self.start_fetch(&mut g, key, fetch));
    }

    /// Runs `fetch` in its own task and records it as the block's fetch in
    /// flight; the caller holds the lock and has made room.
    fn start_fetch<F>(self: &Arc<Self>, g: &mut Inner, key: BlockKey, fetch: F) -> Fetch
    where
        F: Future<Output = Result<Bytes, FsError>> + Send + 'static,
    {
        g.next_fetch += 1;
        let id = g.next_fetch;
        let cache = self.clone();
        let handle = tokio::spawn(async move {
            let r = fetch.await;
            let mut g = cache.inner.lock();
            // Only cache if nobody invalidated the block meanwhile: the
            // entry is still this fetch's.
            let still_wanted = g.inflight.get(&key).is_some_and(|(i, _)| *i == id);
            if still_wanted {
                g.inflight.remove(&key);
            }
            drop(g);
            if let (Ok(data), true) = (&r, still_wanted) {
                cache.insert(key, data.clone());
            }
            r
        });
        let fut: Pin<Box<dyn Future<Output = Result<Bytes, FsError>> + Send>> =
            Box::pin(async move { handle.await.unwrap_or(Err(FsError::IO)) });
        let f = fut.shared();
        g.inflight.insert(key, (id, f.clone()));
        f
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.inner.lock();
        CacheStats {
            bytes: g.bytes,
            blocks: g.lru.len(),
            inflight: g.inflight.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_exceeds_capacity_and_evicts_least_recent() {
        let c = PageCache::new(4, 12);
        for i in 0..5 {
            c.insert((1, i), Bytes::from(vec![i as u8; 4]));
        }
        let s = c.stats();
        assert!(s.bytes <= 12 && s.blocks == 3, "{s:?}");
        assert!(c.get((1, 0)).is_none() && c.get((1, 4)).is_some());
        c.invalidate_range(1, 13, 17); // blocks 3 and 4
        assert!(c.get((1, 3)).is_none() && c.get((1, 4)).is_none());
        assert!(c.get((1, 2)).is_some());
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_fetch() {
        let c = PageCache::new(4, 64);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_fetch((7, 0), async move {
                    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    Ok(Bytes::from_static(b"data"))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(&t.await.unwrap().unwrap()[..], b"data");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(c.stats().blocks, 1);
    }

    /// A fetch that was invalidated while in flight, and finishes after a
    /// new fetch of the same block started, caches nothing: its data is
    /// what the invalidation said was stale.
    #[tokio::test]
    async fn an_invalidated_fetch_does_not_replace_a_newer_one() {
        let c = PageCache::new(4, 64);
        let (old_tx, old_rx) = tokio::sync::oneshot::channel::<Bytes>();
        let (new_tx, new_rx) = tokio::sync::oneshot::channel::<Bytes>();
        let started = |c: &Arc<PageCache>, n: usize| {
            let c = c.clone();
            async move {
                while c.stats().inflight != n {
                    tokio::task::yield_now().await;
                }
            }
        };
        // A reader of block (1, 0) whose fetch returns what `rx` is sent.
        let read = |rx: tokio::sync::oneshot::Receiver<Bytes>| {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_fetch((1, 0), async move { Ok(rx.await.unwrap()) })
                    .await
            })
        };
        let first = read(old_rx);
        started(&c, 1).await;
        c.invalidate_range(1, 0, 4);
        started(&c, 0).await;
        let second = read(new_rx);
        started(&c, 1).await;
        old_tx.send(Bytes::from_static(b"old!")).unwrap();
        assert_eq!(&first.await.unwrap().unwrap()[..], b"old!");
        assert_eq!(c.get((1, 0)), None, "the invalidated fetch cached its data");
        new_tx.send(Bytes::from_static(b"new!")).unwrap();
        assert_eq!(&second.await.unwrap().unwrap()[..], b"new!");
        assert_eq!(c.get((1, 0)).as_deref(), Some(&b"new!"[..]));
    }
}
