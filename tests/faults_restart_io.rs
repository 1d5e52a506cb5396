//! nfs-ganesha killed with SIGKILL and restarted while a writer streams data
//! through the FUSE mount: after fsync/close every byte is on the server.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Kills the server after `after`, waits past its one-second verifier
/// granularity, and restarts it; returns the thread doing so.
fn bounce(g: &NamedGanesha, after: Duration) -> std::thread::JoinHandle<()> {
    let name = g.name.clone();
    let script = std::env::var("CSI_NFS_FUSE_GANESHA_SCRIPT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ganesha.sh").into());
    std::thread::spawn(move || {
        std::thread::sleep(after);
        assert!(
            Command::new(&script)
                .args(["kill", "--name", &name])
                .status()
                .unwrap()
                .success()
        );
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            Command::new(&script)
                .args(["restart", "--name", &name])
                .status()
                .unwrap()
                .success()
        );
    })
}

#[test]
fn dd_1gib_survives_a_server_kill_and_restart() {
    let Some(g) = NamedGanesha::start("ddkill", &[]) else {
        return;
    };
    let src = tempfile::Builder::new()
        .prefix("csi-nfs-fuse-dd")
        .tempfile_in("/dev/shm")
        .unwrap();
    assert!(
        Command::new("dd")
            .args([
                "if=/dev/urandom",
                &format!("of={}", src.path().display()),
                "bs=1M",
                "count=1024",
                "status=none"
            ])
            .status()
            .unwrap()
            .success()
    );
    let mut m = FuseMount::start(
        &g.source(),
        &format!("{},hard,timeo=10,retrans=2", g.mount_opts()),
    )
    .unwrap();
    let killer = bounce(&g, Duration::from_millis(1500));
    let st = Command::new("dd")
        .args([
            &format!("if={}", src.path().display()),
            &format!("of={}", m.path("big").display()),
            "bs=1M",
            "conv=fsync",
            "status=none",
        ])
        .status()
        .unwrap();
    killer.join().unwrap();
    assert!(
        st.success(),
        "dd through the mount failed across the restart"
    );
    assert_eq!(
        sha256(&g.export_dir.join("big")),
        sha256(src.path()),
        "bytes lost across the restart"
    );
    let (st, log) = m.stop_with_log();
    assert!(st.success());
    // Data written UNSTABLE before the kill was resent after the restart.
    assert!(
        log.contains("write verifier changed"),
        "no verifier-driven resend in the log:\n{log}"
    );
}

#[test]
fn fio_crc32c_verify_survives_a_server_kill_and_restart() {
    let Some(g) = NamedGanesha::start("fiokill", &[]) else {
        return;
    };
    let m = FuseMount::start(
        &g.source(),
        &format!("{},hard,timeo=10,retrans=2", g.mount_opts()),
    )
    .unwrap();
    let killer = bounce(&g, Duration::from_millis(1000));
    let out = Command::new("fio")
        .args([
            "--name=verify",
            &format!("--filename={}", m.path("fio.dat").display()),
            "--rw=write",
            "--bs=256k",
            "--size=256M",
            "--ioengine=psync",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--end_fsync=1",
            "--verify_state_save=0",
        ])
        .output()
        .unwrap();
    killer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("verify: bad"), "{text}");
    // The same bytes must be on the server's disk, not only in some cache.
    drop(m);
    let on_disk = std::fs::metadata(g.export_dir.join("fio.dat"))
        .unwrap()
        .len();
    assert_eq!(on_disk, 256 << 20);
}
