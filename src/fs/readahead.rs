//! Sequential-access detection per open file, driving the prefetch window.
//!
//! The window starts at 128 KiB on the second sequential read, doubles on
//! each further one up to the maximum (16 MiB by default), and collapses to
//! nothing on a seek, so random access never triggers readahead.

pub const MIN_WINDOW: u64 = 128 << 10;
pub const MAX_WINDOW: u64 = 16 << 20;

#[derive(Debug, Clone, Default)]
pub struct ReadAhead {
    /// End of the last read, where a sequential reader continues.
    next: u64,
    window: u64,
    max: u64,
}

impl ReadAhead {
    pub fn new(max: u64) -> Self {
        Self {
            max: max.max(MIN_WINDOW),
            ..Default::default()
        }
    }

    /// Records a read of [off, off+len) and returns how far past its end to
    /// prefetch (0: this looks random).
    pub fn observe(&mut self, off: u64, len: u64) -> u64 {
        // Until a stream is established only an exact continuation counts.
        // Once streaming, the kernel's own concurrent readahead requests may
        // arrive a little out of order, so tolerate one window of slack.
        let sequential = if self.window == 0 {
            off == self.next
        } else {
            off + self.window >= self.next && off <= self.next + self.window
        };
        if sequential {
            self.window = if self.window == 0 {
                MIN_WINDOW
            } else {
                (self.window * 2).min(self.max)
            };
            self.next = self.next.max(off + len);
        } else {
            self.window = 0;
            self.next = off + len;
        }
        self.window
    }

    pub fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_from_128k_to_the_max_and_resets_on_seek() {
        let mut ra = ReadAhead::new(MAX_WINDOW);
        let mut off = 0;
        let mut windows = Vec::new();
        for _ in 0..12 {
            windows.push(ra.observe(off, 1 << 20));
            off += 1 << 20;
        }
        assert_eq!(windows[0], MIN_WINDOW, "reading from the start is a stream");
        assert!(windows.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*windows.last().unwrap(), MAX_WINDOW);
        assert_eq!(
            ra.observe(500 << 20, 4096),
            0,
            "a seek collapses the window"
        );
    }

    #[test]
    fn random_reads_never_prefetch() {
        let mut ra = ReadAhead::new(MAX_WINDOW);
        let mut x: u64 = 12345;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = ((x >> 20) % (1 << 30)) & !4095;
            let w = ra.observe(off, 4096);
            assert_eq!(w, 0, "random 4 KiB read at {off} triggered readahead");
        }
    }
}
