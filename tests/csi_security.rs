//! Security of the CSI plugin: secrets never reach the log (even at trace
//! level), the socket and the mount processes have the least permissions
//! that work, and a mount honours the server's root_squash.

mod common;
mod csi_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use csi_common::*;
use csi_nfs_fuse::csi::supervisor::CHILD_CAPABILITIES;

/// A marker no code path could produce by chance.
fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("Zq9{}x{nanos:x}SECRETMARK", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_logged_even_at_trace_level() {
    let mark = marker();
    // The marker as a value and inside a key, in every request that has
    // secrets; the calls succeed where a server is available and fail
    // otherwise, so both the success and the error paths log.
    let secrets = kv(&[
        ("password", &mark),
        (&format!("key-{mark}"), "v"),
        ("token", &format!("Bearer {mark}")),
    ]);
    let mut p = Plugin::start_logged(&[], "trace").await;
    let c = || p.controller();
    let n = || p.node();

    let g = ganesha();
    let params = match &g {
        Some(g) => ganesha_params(g, &[]),
        None => kv(&[
            ("server", "127.0.0.1"),
            ("share", "/export"),
            ("mountOptions", "port=1,mountport=1"),
        ]),
    };
    let name = unique("secret");
    let mut req = create_req(&name, params.clone());
    req.secrets = secrets.clone();
    let created = c().create_volume(req).await;
    let vol = match (&g, created) {
        (Some(_), Ok(r)) => r.into_inner().volume.unwrap(),
        (Some(_), Err(e)) => panic!("CreateVolume: {e:?}"),
        (None, r) => {
            assert_code(r, Code::Unavailable, "");
            Volume {
                volume_id: VolumeRef {
                    server: "127.0.0.1".into(),
                    share: "/export".into(),
                    sub_dir: name.clone(),
                    on_delete: OnDelete::Delete,
                    port: Some(1),
                    mountport: Some(1),
                }
                .encode()
                .unwrap(),
                ..Default::default()
            }
        }
    };
    // Refused requests carrying secrets: an unknown parameter, an
    // oversized secrets map (its error names only the field and size).
    let mut bad = create_req("bad", kv(&[("colour", "red")]));
    bad.secrets = secrets.clone();
    assert_code(
        c().create_volume(bad).await,
        Code::InvalidArgument,
        "colour",
    );
    let mut big = create_req("big", params.clone());
    big.secrets = secrets.clone();
    big.secrets
        .insert("pad".into(), mark.repeat(4096 / mark.len() + 1));
    let e = c().create_volume(big).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("secrets is") && !e.message().contains(&mark));

    let _ = c()
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await;
    let target = p.target("secret");
    let mut pr = publish_req(&vol, &target, false);
    pr.secrets = secrets.clone();
    let published = n().node_publish_volume(pr).await;
    if g.is_some() {
        published.unwrap();
        let t = target.clone();
        within(Duration::from_secs(20), move || {
            std::fs::write(t.join("f"), b"x").unwrap()
        })
        .await;
        unpublish(&p, &vol.volume_id, &target).await.unwrap();
    } else {
        assert!(published.is_err());
    }
    let mut bad_pub = publish_req(&vol, &target, false);
    bad_pub.secrets = secrets.clone();
    bad_pub.target_path = "relative".into();
    assert!(n().node_publish_volume(bad_pub).await.is_err());
    let dr = c()
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: secrets.clone(),
        })
        .await;
    assert_eq!(dr.is_ok(), g.is_some(), "{dr:?}");
    let _ = c()
        .delete_volume(DeleteVolumeRequest {
            volume_id: "fake-vol-id-1".into(),
            secrets: secrets.clone(),
        })
        .await;

    // Stop the plugin so everything it buffered is written out.
    assert!(p.stop().success());
    let log = p.log_text();
    let lines = log.lines().count();
    eprintln!(
        "trace log: {lines} lines, {} bytes, {} TRACE lines",
        log.len(),
        log.matches(" TRACE ").count()
    );
    // The log is the real thing: trace level, the calls are in it.
    assert!(log.contains(" TRACE "), "trace level not active:\n{log}");
    assert!(log.contains("CreateVolume") && log.contains("NodePublishVolume"));
    assert!(lines > 20, "suspiciously short log:\n{log}");
    for (i, l) in log.lines().enumerate() {
        assert!(
            !l.contains(&mark),
            "a secret reached the log at line {}: {l}",
            i + 1
        );
    }
}

fn cap_mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

fn hex_field(status: &HashMap<String, String>, key: &str) -> u64 {
    u64::from_str_radix(&status[key], 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_and_mount_processes_have_least_privilege() {
    // The socket: 0660 by default (dockerd runs as root), 0600 on request,
    // and nothing looser is accepted.
    let p = Plugin::start(&[]).await;
    let md = std::fs::metadata(&p.sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    assert_eq!(md.uid(), nix::unistd::geteuid().as_raw());
    for bad in ["666", "777", "644"] {
        let out = Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
            .args([
                "plugin",
                "--endpoint",
                "/tmp/never.sock",
                "--socket-mode",
                bad,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "socket mode {bad} accepted");
    }
    drop(p);

    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let plugin_caps = hex_field(
        &proc_status(p.child.as_ref().unwrap().id() as i32),
        "CapEff",
    );
    let name = unique("privs");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("privs");
    publish(&p, &vol, &t, false).await.unwrap();
    let pid = one_mount_pid(&t);
    let st = proc_status(pid);
    let want = cap_mask(&CHILD_CAPABILITIES);
    eprintln!(
        "plugin CapEff {plugin_caps:016x}; mount process {pid}: CapEff {} CapPrm {} CapBnd {} CapInh {} CapAmb {} NoNewPrivs {}",
        st["CapEff"], st["CapPrm"], st["CapBnd"], st["CapInh"], st["CapAmb"], st["NoNewPrivs"]
    );
    if plugin_caps & (1 << 8) != 0 {
        // The plugin holds CAP_SETPCAP (root): the child keeps only
        // CAP_SYS_ADMIN and CAP_NET_BIND_SERVICE.
        for key in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(hex_field(&st, key), want, "{key} of the mount process");
        }
        assert_eq!(hex_field(&st, "CapInh"), 0);
        assert_eq!(hex_field(&st, "CapAmb"), 0);
        assert_eq!(st["NoNewPrivs"], "1");
    }
    // Everything works with those: I/O, reconnect-free NFS traffic from a
    // reserved port (resvport), and the child's own unmount on SIGTERM.
    let conns = tcp_conns(pid);
    assert!(
        conns.iter().any(|c| c.state == 1 && c.local_port < 1024),
        "no reserved-port NFS connection: {conns:?}"
    );
    let a = t.clone();
    within(Duration::from_secs(20), move || {
        std::fs::write(a.join("f"), b"least privilege").unwrap();
        assert_eq!(std::fs::read(a.join("f")).unwrap(), b"least privilege");
    })
    .await;
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    assert!(!is_mounted(&t) && !t.exists() && mount_pids(&t).is_empty());
    let log = p.log_text();
    assert!(
        !log.contains("unmount failed"),
        "the child could not unmount:\n{log}"
    );
    assert!(
        !log.contains("detached mount"),
        "the supervisor had to detach what the child should have unmounted:\n{log}"
    );
    delete(&p, &vol.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_squash_is_honoured() {
    let Some(sq) = NamedGanesha::start("csi-squash", &["--squash", "root_squash"]) else {
        return;
    };
    let p = Plugin::start(&[]).await;
    let params = kv(&[
        ("server", "127.0.0.1"),
        ("share", &sq.export_path),
        ("mountOptions", &sq.mount_opts()),
        ("mountPermissions", "0777"),
    ]);
    let name = unique("squash");
    // The controller's MKDIR as root is squashed too.
    let vol = create(&p, &name, params).await.unwrap();
    let vdir = sq.export_dir.join(&name);
    let md = std::fs::metadata(&vdir).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534), "volume dir owner");

    // A file only uid 1000 may read, put straight into the export.
    std::fs::write(vdir.join("private"), b"for uid 1000 only").unwrap();
    std::os::unix::fs::chown(vdir.join("private"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(vdir.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let t = p.target("squash");
    publish(&p, &vol, &t, false).await.unwrap();
    let a = t.clone();
    let (created, denied) = within(Duration::from_secs(20), move || {
        std::fs::write(a.join("by-root"), b"root wrote this").unwrap();
        (
            std::fs::metadata(a.join("by-root")).unwrap(),
            std::fs::read(a.join("private")).unwrap_err(),
        )
    })
    .await;
    let on_server = std::fs::metadata(vdir.join("by-root")).unwrap();
    eprintln!(
        "root_squash: file created by root is {}:{} on the server ({}:{} through the mount); reading a 0600 file of uid 1000: {denied}",
        on_server.uid(),
        on_server.gid(),
        created.uid(),
        created.gid()
    );
    assert_eq!((on_server.uid(), on_server.gid()), (65534, 65534));
    assert_eq!((created.uid(), created.gid()), (65534, 65534));
    assert_eq!(denied.raw_os_error(), Some(libc::EACCES), "{denied}");
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    // DeleteVolume as squashed root: the 0600 file in a 0777 dir can go.
    delete(&p, &vol.volume_id).await.unwrap();
    assert!(!vdir.exists());
}
