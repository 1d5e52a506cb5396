//! The `-o` option parser and the NFS source parser: errors, never panics.
#![no_main]

use csi_nfs_fuse::options::{MountOptions, NfsSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(o) = MountOptions::parse(s) {
        let _ = o.connect_config();
    }
    if let Ok(src) = NfsSource::parse(s) {
        assert!(src.path.starts_with('/'));
        assert!(!src.path.split('/').any(|c| c == ".."));
    }
});
