//! The export's directory is deleted and re-created on the server while it
//! is mounted: gone files report ESTALE, the root revalidates by itself, and
//! the new tree is visible without a remount.

mod common;

use std::fs;
use std::io::Read;

use common::*;

#[test]
fn recreated_export_revalidates_without_remount() {
    let Some(g) = ganesha() else { return };
    let (m, server) = g.fuse_mount("stale", "actimeo=1");
    fs::write(m.path("old"), b"old data").unwrap();
    let mut held = fs::File::open(m.path("old")).unwrap();
    assert_eq!(fs::read(m.path("old")).unwrap(), b"old data");

    fs::remove_dir_all(&server).unwrap();
    fs::create_dir(&server).unwrap();
    fs::write(server.join("new"), b"new tree").unwrap();

    // The descriptor of the deleted file: ESTALE once the server forgets the
    // inode. Ganesha keeps recently used files open in its FD cache, so it may
    // still answer for a while; either way the mount must not hang or panic.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    match held.metadata() {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
        Ok(md) => eprintln!("server still serves the unlinked file ({} bytes)", md.len()),
    }
    let mut buf = vec![0u8; 16];
    let _ = held.read(&mut buf);

    // The path is resolved again against the re-created directory.
    let names: Vec<String> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["new".to_string()]);
    assert_eq!(fs::read(m.path("new")).unwrap(), b"new tree");
    let gone = fs::metadata(m.path("old")).unwrap_err();
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT), "{gone}");
    fs::write(m.path("after"), b"written after").unwrap();
    assert_eq!(fs::read(server.join("after")).unwrap(), b"written after");
}
