//! `csi-nfs-fuse plugin` end to end: the real binary on a unix socket, a
//! tonic client, nfs-ganesha and real FUSE mounts. No mocks.

mod common;
mod csi_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use csi_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_capabilities_and_socket() {
    // A stale socket file from a dead plugin is replaced.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut p = Plugin::start_at(dir, sock.clone(), &[]).await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    let info = p
        .identity()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi-nfs-fuse.csi.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = p
        .identity()
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use plugin_capability::{Service, Type, service};
    assert_eq!(
        caps,
        vec![PluginCapability {
            r#type: Some(Type::Service(Service {
                r#type: service::Type::ControllerService as i32
            }))
        }]
    );
    let probe = p
        .identity()
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let ccaps: Vec<i32> = p
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            None => -1,
        })
        .collect();
    assert_eq!(
        ccaps,
        vec![controller_service_capability::rpc::Type::CreateDeleteVolume as i32],
        "only CREATE_DELETE_VOLUME: no PUBLISH_UNPUBLISH"
    );
    let ncaps: Vec<i32> = p
        .node()
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type {
            Some(node_service_capability::Type::Rpc(r)) => r.r#type,
            None => -1,
        })
        .collect();
    assert_eq!(
        ncaps,
        vec![node_service_capability::rpc::Type::GetVolumeStats as i32],
        "only GET_VOLUME_STATS: no STAGE_UNSTAGE"
    );
    let ni = p
        .node()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "test-node");

    // Everything else is UNIMPLEMENTED.
    assert_code(
        p.node()
            .node_stage_volume(NodeStageVolumeRequest::default())
            .await,
        Code::Unimplemented,
        "",
    );
    assert_code(
        p.controller()
            .controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
        "",
    );
    assert_code(
        p.controller()
            .list_volumes(ListVolumesRequest::default())
            .await,
        Code::Unimplemented,
        "",
    );

    // A second plugin cannot steal a live socket.
    let out = Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
        .args(["plugin", "--endpoint"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));

    // SIGTERM: clean exit, socket removed.
    let st = p.stop();
    assert!(st.success(), "plugin exit: {st:?}\n{}", p.log_text());
    assert!(!sock.exists(), "socket left behind");

    // Probe fails when FUSE is unavailable.
    let p = Plugin::start(&["--fuse-device", "/nonexistent/fuse"]).await;
    assert_code(
        p.identity().probe(ProbeRequest {}).await,
        Code::FailedPrecondition,
        "/nonexistent/fuse",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_from_env_and_socket_mode() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("env.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
        .args(["plugin", "--socket-mode", "600"])
        .env("CSI_ENDPOINT", &sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let ch = loop {
        if let Ok(ch) = connect(&sock).await {
            break ch;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "no socket within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let node_id = NodeClient::new(ch)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_id;
    let host = std::fs::read_to_string("/node_hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| nix::unistd::gethostname().unwrap().into_string().unwrap());
    assert_eq!(node_id, host);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_fields_and_error_codes() {
    let p = Plugin::start(&[]).await;
    let params = kv(&[("server", "127.0.0.1"), ("share", "/export")]);
    let c = || p.controller();

    // CreateVolume.
    assert_code(
        create(&p, "", params.clone()).await,
        Code::InvalidArgument,
        "name",
    );
    let mut r = create_req("v", params.clone());
    r.volume_capabilities.clear();
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    let mut r = create_req("v", params.clone());
    r.volume_capabilities = vec![block_cap()];
    assert_code(c().create_volume(r).await, Code::InvalidArgument, "block");
    let mut r = create_req("v", params.clone());
    r.volume_capabilities = vec![mount_cap(Mode::Unknown)];
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "access mode",
    );
    let mut r = create_req("v", params.clone());
    r.volume_capabilities = vec![VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: None,
    }];
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "access_type",
    );
    let mut r = create_req("v", params.clone());
    r.volume_capabilities = vec![VolumeCapability {
        access_mode: None,
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }];
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "access_mode",
    );
    let mut r = create_req("v", params.clone());
    r.capacity_range = Some(CapacityRange {
        required_bytes: 10,
        limit_bytes: 5,
    });
    assert_code(c().create_volume(r).await, Code::OutOfRange, "limit_bytes");

    let with = |extra: &[(&str, &str)]| {
        let mut m = params.clone();
        m.extend(kv(extra));
        m
    };
    assert_code(
        create(&p, "v", with(&[("colour", "red")])).await,
        Code::InvalidArgument,
        "'colour'",
    );
    assert_code(
        create(&p, "v", kv(&[("share", "/export")])).await,
        Code::InvalidArgument,
        "'server' is required",
    );
    assert_code(
        create(&p, "v", kv(&[("server", "127.0.0.1")])).await,
        Code::InvalidArgument,
        "'share' is required",
    );
    assert_code(
        create(&p, "v", with(&[("mountOptions", "nconnect=99")])).await,
        Code::InvalidArgument,
        "nconnect=99",
    );
    assert_code(
        create(&p, "v", with(&[("onDelete", "shred")])).await,
        Code::InvalidArgument,
        "shred",
    );
    assert_code(
        create(&p, "v", with(&[("mountPermissions", "rwxrwxrwx")])).await,
        Code::InvalidArgument,
        "octal",
    );
    // Path traversal, absolute and empty subDirs.
    for bad in ["../x", "/abs", "a/../../b", "a//b", "..", "a/./b", ""] {
        assert_code(
            create(&p, "v", with(&[("subDir", bad)])).await,
            Code::InvalidArgument,
            "subDir",
        );
    }
    assert_code(
        create(&p, "..", params.clone()).await,
        Code::InvalidArgument,
        "..",
    );
    assert_code(
        create(&p, "v", with(&[("share", "/export/../etc")])).await,
        Code::InvalidArgument,
        "share",
    );
    // A volume id that cannot fit the spec's 128 bytes is refused by name.
    assert_code(
        create(&p, &"n".repeat(128), params.clone()).await,
        Code::InvalidArgument,
        "128",
    );

    // DeleteVolume.
    assert_code(delete(&p, "").await, Code::InvalidArgument, "volume_id");
    delete(&p, "fake-vol-id-123").await.unwrap();
    // A forged id that climbs out of the share is not a volume: OK, no action.
    delete(&p, "v1#127.0.0.1#/export#../../etc#delete")
        .await
        .unwrap();

    // ValidateVolumeCapabilities.
    assert_code(
        validate(&p, "", vec![mount_cap(Mode::SingleNodeWriter)]).await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_code(
        validate(&p, "fake-vol-id-123", vec![]).await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    assert_code(
        validate(
            &p,
            "fake-vol-id-123",
            vec![mount_cap(Mode::SingleNodeWriter)],
        )
        .await,
        Code::NotFound,
        "fake-vol-id-123",
    );

    // NodePublishVolume.
    let fake = Volume {
        volume_id: "fake-vol-id-123".into(),
        ..Default::default()
    };
    let target = p.target("t");
    let n = || p.node();
    let mut r = publish_req(&fake, &target, false);
    r.volume_id.clear();
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut r = publish_req(&fake, &target, false);
    r.target_path.clear();
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "target_path",
    );
    let mut r = publish_req(&fake, &target, false);
    r.volume_capability = None;
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    let mut r = publish_req(&fake, &target, false);
    r.volume_capability = Some(block_cap());
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "block",
    );
    let mut r = publish_req(&fake, &target, false);
    r.target_path = "relative/path".into();
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "absolute",
    );
    assert_code(
        n().node_publish_volume(publish_req(&fake, &target, false))
            .await,
        Code::NotFound,
        "fake-vol-id-123",
    );
    assert!(!target.exists(), "nothing created for an unknown volume");

    // NodeUnpublishVolume: required fields; an unknown target is OK and removed.
    assert_code(
        unpublish(&p, "", &target).await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut r = NodeUnpublishVolumeRequest {
        volume_id: "v".into(),
        target_path: String::new(),
    };
    assert_code(
        n().node_unpublish_volume(r.clone()).await,
        Code::InvalidArgument,
        "target_path",
    );
    std::fs::create_dir_all(&target).unwrap();
    r.target_path = target.to_string_lossy().into_owned();
    n().node_unpublish_volume(r.clone()).await.unwrap();
    assert!(!target.exists(), "target path removed");
    n().node_unpublish_volume(r).await.unwrap();

    // NodeGetVolumeStats.
    assert_code(
        stats(&p, "", "/tmp").await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_code(
        stats(&p, "v", "").await,
        Code::InvalidArgument,
        "volume_path",
    );
    assert_code(
        stats(&p, "fake-vol-id-123", "some/path").await,
        Code::NotFound,
        "some/path",
    );
    assert_code(
        stats(&p, "fake-vol-id-123", p.dir.path().to_str().unwrap()).await,
        Code::NotFound,
        "not a published path",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_publish_twice_stats_unpublish_delete() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let name = unique("life");
    let params = ganesha_params(
        &g,
        &[("mountPermissions", "0777"), ("mountOptions", "nconnect=2")],
    );

    let vol = create(&p, &name, params.clone()).await.unwrap();
    assert_eq!(vol.capacity_bytes, 0);
    assert!(vol.volume_id.len() <= 128);
    let v = VolumeRef::decode(&vol.volume_id).unwrap();
    assert_eq!(
        (
            v.server.as_str(),
            v.share.as_str(),
            v.sub_dir.as_str(),
            v.on_delete
        ),
        (
            g.host.as_str(),
            g.export.as_str(),
            name.as_str(),
            OnDelete::Delete
        )
    );
    let ctx = &vol.volume_context;
    assert_eq!(ctx["server"], g.host);
    assert_eq!(ctx["share"], g.export);
    assert_eq!(ctx["subDir"], name);
    assert_eq!(ctx["mountOptions"], "nconnect=2");
    let on_disk = g.dir.join(&name);
    let md = std::fs::metadata(&on_disk).expect("volume directory on the server");
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o777, "mountPermissions applied");

    // Idempotent create; incompatible repeat.
    let again = create(&p, &name, params.clone()).await.unwrap();
    assert_eq!(again, vol);
    let mut other = params.clone();
    other.insert("onDelete".into(), "retain".into());
    assert_code(create(&p, &name, other).await, Code::AlreadyExists, &name);

    // Validate: confirmed for mount, not for block.
    let ok = validate(
        &p,
        &vol.volume_id,
        vec![mount_cap(Mode::MultiNodeMultiWriter)],
    )
    .await
    .unwrap();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let no = validate(&p, &vol.volume_id, vec![block_cap()])
        .await
        .unwrap();
    assert!(no.confirmed.is_none() && no.message.contains("block"));

    // GetCapacity via FSSTAT.
    let cap = p
        .controller()
        .get_capacity(GetCapacityRequest {
            parameters: ganesha_params(&g, &[]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);

    // Publish on two targets (whose parents do not exist yet).
    let t1 = p.target("a/t1");
    let t2 = p.target("b/t2");
    let started = Instant::now();
    publish(&p, &vol, &t1, false).await.unwrap();
    eprintln!("first publish took {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3));
    publish(&p, &vol, &t2, false).await.unwrap();
    assert!(is_mounted(&t1) && is_mounted(&t2));
    let pid1 = one_mount_pid(&t1);
    let pid2 = one_mount_pid(&t2);
    assert_ne!(pid1, pid2, "one mount process per target");

    // A write through one is visible through the other and on the server.
    let (a, b) = (t1.clone(), t2.clone());
    let data = within(Duration::from_secs(20), move || {
        std::fs::write(a.join("hello.txt"), b"written through t1").unwrap();
        std::fs::read(b.join("hello.txt")).unwrap()
    })
    .await;
    assert_eq!(data, b"written through t1");
    assert_eq!(
        std::fs::read(on_disk.join("hello.txt")).unwrap(),
        b"written through t1"
    );

    // Idempotent publish: same process; different arguments: ALREADY_EXISTS.
    publish(&p, &vol, &t1, false).await.unwrap();
    assert_eq!(one_mount_pid(&t1), pid1);
    assert_code(
        publish(&p, &vol, &t1, true).await,
        Code::AlreadyExists,
        "different arguments",
    );

    // Read-only publish is honoured.
    let t3 = p.target("ro");
    publish(&p, &vol, &t3, true).await.unwrap();
    let c = t3.clone();
    let err = within(Duration::from_secs(20), move || {
        assert_eq!(
            std::fs::read(c.join("hello.txt")).unwrap(),
            b"written through t1"
        );
        std::fs::write(c.join("nope.txt"), b"x").unwrap_err()
    })
    .await;
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    unpublish(&p, &vol.volume_id, &t3).await.unwrap();

    // Stats.
    let st = stats(&p, &vol.volume_id, t1.to_str().unwrap())
        .await
        .unwrap();
    let bytes = st
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = st
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert!(
        bytes.total > 0 && bytes.available <= bytes.total && bytes.used >= 0,
        "{bytes:?}"
    );
    assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
    assert_code(
        stats(&p, "other-volume", t1.to_str().unwrap()).await,
        Code::NotFound,
        "",
    );

    // Unpublish: t1 goes (mount and directory), t2 keeps working.
    unpublish(&p, &vol.volume_id, &t1).await.unwrap();
    assert!(!t1.exists(), "target path removed");
    assert!(!is_mounted(&t1));
    assert!(mount_pids(&t1).is_empty(), "mount process reaped");
    assert!(
        std::fs::metadata(&on_disk).is_ok(),
        "unpublish never touches the data"
    );
    unpublish(&p, &vol.volume_id, &t1).await.unwrap();
    let b = t2.clone();
    within(Duration::from_secs(20), move || {
        assert_eq!(
            std::fs::read(b.join("hello.txt")).unwrap(),
            b"written through t1"
        );
    })
    .await;
    assert_code(
        stats(&p, &vol.volume_id, t1.to_str().unwrap()).await,
        Code::NotFound,
        "does not exist",
    );
    unpublish(&p, &vol.volume_id, &t2).await.unwrap();
    assert!(!t2.exists());

    // Delete: the directory tree is gone; repeats are OK.
    std::fs::create_dir_all(on_disk.join("deep/er/still")).unwrap();
    std::fs::write(on_disk.join("deep/er/still/f"), b"x").unwrap();
    delete(&p, &vol.volume_id).await.unwrap();
    assert!(!on_disk.exists(), "volume directory deleted");
    delete(&p, &vol.volume_id).await.unwrap();
    assert_code(
        validate(
            &p,
            &vol.volume_id,
            vec![mount_cap(Mode::MultiNodeMultiWriter)],
        )
        .await,
        Code::NotFound,
        "does not exist",
    );
    // The name is free again after delete.
    let vol2 = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    assert!(on_disk.is_dir());
    delete(&p, &vol2.volume_id).await.unwrap();
    assert!(!on_disk.exists());

    let log = p.log_text();
    assert!(!log.contains(SECRET), "a secret reached the log");
    assert!(log.contains("CreateVolume") && log.contains("NodePublishVolume"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_delete_archive_and_retain() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let base = unique("ondel");

    // archive, nested subDir: renamed within its parent.
    let arch = create(
        &p,
        "arch",
        ganesha_params(
            &g,
            &[("subDir", &format!("{base}/vol")), ("onDelete", "archive")],
        ),
    )
    .await
    .unwrap();
    assert!(g.dir.join(&base).join("vol").is_dir());
    std::fs::write(g.dir.join(&base).join("vol/keep.txt"), b"archived data").unwrap();
    delete(&p, &arch.volume_id).await.unwrap();
    assert!(!g.dir.join(&base).join("vol").exists());
    assert_eq!(
        std::fs::read(g.dir.join(&base).join("archived-vol/keep.txt")).unwrap(),
        b"archived data"
    );
    delete(&p, &arch.volume_id).await.unwrap();
    // A second archive of the same name does not overwrite the first.
    let arch2 = create(
        &p,
        "arch2",
        ganesha_params(
            &g,
            &[("subDir", &format!("{base}/vol")), ("onDelete", "archive")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(arch2.volume_id, arch.volume_id);
    std::fs::write(g.dir.join(&base).join("vol/second.txt"), b"2").unwrap();
    delete(&p, &arch2.volume_id).await.unwrap();
    assert!(g.dir.join(&base).join("archived-vol/keep.txt").exists());
    let archives: Vec<String> = std::fs::read_dir(g.dir.join(&base))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("archived-vol-"))
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    assert!(
        g.dir
            .join(&base)
            .join(&archives[0])
            .join("second.txt")
            .exists()
    );

    // retain: nothing happens.
    let keep = create(
        &p,
        "keep",
        ganesha_params(
            &g,
            &[("subDir", &format!("{base}/kept")), ("onDelete", "RETAIN")],
        ),
    )
    .await
    .unwrap();
    std::fs::write(g.dir.join(&base).join("kept/data"), b"still here").unwrap();
    delete(&p, &keep.volume_id).await.unwrap();
    assert_eq!(
        std::fs::read(g.dir.join(&base).join("kept/data")).unwrap(),
        b"still here"
    );
    std::fs::remove_dir_all(g.dir.join(&base)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_never_leaves_the_volume_directory() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let base = unique("escape");
    let outside = g.dir.join(format!("{base}-outside"));
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("canary.txt"), b"alive").unwrap();
    std::fs::write(outside.join("sub/canary2.txt"), b"alive").unwrap();

    let vol = create(&p, &base, ganesha_params(&g, &[])).await.unwrap();
    let vdir = g.dir.join(&base);
    // Symlinks to the outside directory (absolute and relative, as the
    // server's paths and as a client would see them), to the canary file,
    // a hard link to the canary, nested dirs with more links.
    std::os::unix::fs::symlink(&outside, vdir.join("abs-link")).unwrap();
    std::os::unix::fs::symlink(format!("../{base}-outside"), vdir.join("rel-link")).unwrap();
    std::os::unix::fs::symlink(
        format!("{}/{base}-outside", g.export),
        vdir.join("export-link"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.join("canary.txt"), vdir.join("file-link")).unwrap();
    std::fs::hard_link(outside.join("canary.txt"), vdir.join("hard-link")).unwrap();
    std::fs::create_dir_all(vdir.join("d1/d2")).unwrap();
    std::os::unix::fs::symlink("../../..", vdir.join("d1/d2/up")).unwrap();
    std::fs::write(vdir.join("d1/d2/file"), b"inside").unwrap();

    delete(&p, &vol.volume_id).await.unwrap();
    assert!(!vdir.exists(), "volume directory deleted");
    assert_eq!(std::fs::read(outside.join("canary.txt")).unwrap(), b"alive");
    assert_eq!(
        std::fs::read(outside.join("sub/canary2.txt")).unwrap(),
        b"alive"
    );
    assert!(g.dir.is_dir(), "export root intact");

    // The volume directory itself replaced by a symlink: only the link goes.
    let vol = create(&p, &base, ganesha_params(&g, &[])).await.unwrap();
    std::fs::remove_dir(&vdir).unwrap();
    std::os::unix::fs::symlink(&outside, &vdir).unwrap();
    delete(&p, &vol.volume_id).await.unwrap();
    assert!(
        std::fs::symlink_metadata(&vdir).is_err(),
        "the link is removed"
    );
    assert_eq!(std::fs::read(outside.join("canary.txt")).unwrap(), b"alive");
    assert_eq!(
        std::fs::read(outside.join("sub/canary2.txt")).unwrap(),
        b"alive"
    );

    // A parent component replaced by a symlink: never walked through.
    let nested = create(
        &p,
        "nested",
        ganesha_params(&g, &[("subDir", &format!("{base}-p/vol"))]),
    )
    .await
    .unwrap();
    std::fs::remove_dir_all(g.dir.join(format!("{base}-p"))).unwrap();
    std::fs::create_dir_all(outside.join("vol")).unwrap();
    std::fs::write(outside.join("vol/canary3.txt"), b"alive").unwrap();
    std::os::unix::fs::symlink(&outside, g.dir.join(format!("{base}-p"))).unwrap();
    delete(&p, &nested.volume_id).await.unwrap();
    assert_eq!(
        std::fs::read(outside.join("vol/canary3.txt")).unwrap(),
        b"alive"
    );
    std::fs::remove_file(g.dir.join(format!("{base}-p"))).unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_fast() {
    let p = Plugin::start(&[]).await;
    // Nothing listens on port 1: refused at once.
    let t = Instant::now();
    let r = create(
        &p,
        "unreach",
        kv(&[
            ("server", "127.0.0.1"),
            ("share", "/export"),
            ("mountOptions", "port=1,mountport=1"),
        ]),
    )
    .await;
    assert_code(r, Code::Unavailable, "127.0.0.1");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A server that accepts connections but never answers: a timeout, in seconds.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let t = Instant::now();
    let r = create(
        &p,
        "silent",
        kv(&[
            ("server", "127.0.0.1"),
            ("share", "/export"),
            ("mountOptions", &format!("port={port},mountport={port}")),
        ]),
    )
    .await;
    let e = r.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());

    // Publishing a volume on a refusing server fails fast too, leaving no mount.
    let id = VolumeRef {
        server: "127.0.0.1".into(),
        share: "/export".into(),
        sub_dir: "x".into(),
        on_delete: OnDelete::Delete,
        port: Some(1),
        mountport: Some(1),
    }
    .encode()
    .unwrap();
    let vol = Volume {
        volume_id: id.clone(),
        ..Default::default()
    };
    let target = p.target("unreach");
    let t = Instant::now();
    assert_code(
        publish(&p, &vol, &target, false).await,
        Code::Unavailable,
        "mount failed",
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!is_mounted(&target));
    assert!(mount_pids(&target).is_empty());
    // DeleteVolume cannot reach it either: retryable, not OK.
    assert_code(delete(&p, &id).await, Code::Unavailable, "");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_export_and_missing_directory() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let r = create(
        &p,
        &unique("noexp"),
        kv(&[("server", &g.host), ("share", "/no/such/export")]),
    )
    .await;
    // ganesha answers MNT3ERR_ACCES for an export it does not have.
    assert_code(r, Code::FailedPrecondition, "'/no/such/export'");

    // Publish of a volume whose directory is gone from the server.
    let name = unique("gone");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    std::fs::remove_dir(g.dir.join(&name)).unwrap();
    let target = p.target("gone");
    // ganesha answers the MNT with a cached handle that is then STALE
    // (NOT_FOUND), or, once its cache forgot the path, with MNT3ERR_ACCES.
    let e = publish(&p, &vol, &target, false).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::NotFound | Code::FailedPrecondition),
        "{e:?}"
    );
    assert!(e.message().contains(&name), "{}", e.message());
    assert!(!is_mounted(&target));
    delete(&p, &vol.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_mount_child_is_recovered() {
    let Some(g) = ganesha() else { return };
    let p = Plugin::start(&[]).await;
    let name = unique("crash");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("crash");
    publish(&p, &vol, &t, false).await.unwrap();
    let a = t.clone();
    within(Duration::from_secs(20), move || {
        std::fs::write(a.join("f.txt"), b"before the crash").unwrap()
    })
    .await;

    // kill -9: the supervisor notices, logs why, detaches the dead mount
    // and starts a new child by itself.
    let pid = one_mount_pid(&t);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let restarted = eventually(Duration::from_secs(10), || {
        let pids = mount_pids(&t);
        pids.len() == 1 && pids[0] != pid && is_mounted(&t)
    })
    .await;
    assert!(restarted, "not restarted; log:\n{}", p.log_text());
    let a = t.clone();
    let data = within(Duration::from_secs(20), move || {
        std::fs::read(a.join("f.txt")).unwrap()
    })
    .await;
    assert_eq!(data, b"before the crash");
    let log = p.log_text();
    assert!(log.contains("died unexpectedly"), "{log}");
    assert!(log.contains("SIGKILL"), "exit reason logged: {log}");

    // kill -9 again, then NodePublish at once (as a CO retry would): the
    // stale mount is cleaned and the volume is readable when it returns.
    let pid = one_mount_pid(&t);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || mount_pids(&t).is_empty()).await,
        "killed child still there"
    );
    publish(&p, &vol, &t, false).await.unwrap();
    let a = t.clone();
    let data = within(Duration::from_secs(20), move || {
        std::fs::read(a.join("f.txt")).unwrap()
    })
    .await;
    assert_eq!(data, b"before the crash");
    // The restart loop and the publish did not both start a child.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(mount_pids(&t).len(), 1);

    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    assert!(!t.exists() && mount_pids(&t).is_empty());
    delete(&p, &vol.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_restart_adopts_live_mounts_and_cleans_stale_ones() {
    let Some(g) = ganesha() else { return };
    let mut p = Plugin::start(&[]).await;
    let name = unique("restart");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("r");
    publish(&p, &vol, &t, false).await.unwrap();
    let child = one_mount_pid(&t);

    // The plugin crashes; its mount child keeps serving.
    let dir = p.crash();
    let sock = p.sock.clone();
    drop(p);
    let p = Plugin::start_at(dir, sock, &[]).await;
    assert_eq!(one_mount_pid(&t), child);
    // Same publish: adopted, same process; different arguments: refused.
    assert_code(
        publish(&p, &vol, &t, true).await,
        Code::AlreadyExists,
        "different arguments",
    );
    publish(&p, &vol, &t, false).await.unwrap();
    assert_eq!(one_mount_pid(&t), child, "adopted, not remounted");
    let a = t.clone();
    within(Duration::from_secs(20), move || {
        std::fs::write(a.join("x"), b"1").unwrap()
    })
    .await;
    stats(&p, &vol.volume_id, t.to_str().unwrap())
        .await
        .unwrap();

    // Plugin and child both die: the stale mount is detected and remounted.
    let mut p = p;
    let dir = p.crash();
    let sock = p.sock.clone();
    drop(p);
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    assert!(eventually(Duration::from_secs(5), || mount_pids(&t).is_empty()).await);
    let e = within(Duration::from_secs(5), {
        let t = t.clone();
        move || std::fs::metadata(&t).unwrap_err()
    })
    .await;
    // ENOTCONN, or ECONNABORTED when the stat raced the kernel's abort of
    // the connection (the dying child's memory, and so its cmdline, goes
    // before its /dev/fuse descriptors).
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{e}"
    );
    let p = Plugin::start_at(dir, sock, &[]).await;
    publish(&p, &vol, &t, false).await.unwrap();
    let a = t.clone();
    let data = within(Duration::from_secs(20), move || {
        std::fs::read(a.join("x")).unwrap()
    })
    .await;
    assert_eq!(data, b"1");
    unpublish(&p, &vol.volume_id, &t).await.unwrap();
    assert!(!t.exists());
    delete(&p, &vol.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_unmounts_published_volumes() {
    let Some(g) = ganesha() else { return };
    let mut p = Plugin::start(&[]).await;
    let name = unique("term");
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let t = p.target("term");
    publish(&p, &vol, &t, false).await.unwrap();
    let a = t.clone();
    within(Duration::from_secs(20), move || {
        std::fs::write(a.join("last"), b"flushed").unwrap()
    })
    .await;
    let st = p.stop();
    assert!(st.success(), "{st:?}");
    assert!(!is_mounted(&t), "mount stopped with the plugin");
    assert!(mount_pids(&t).is_empty());
    assert_eq!(
        std::fs::read(g.dir.join(&name).join("last")).unwrap(),
        b"flushed"
    );
    std::fs::remove_dir_all(g.dir.join(&name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mount_has_its_own_channel() {
    let Some(g) = ganesha() else { return };
    let Some(g2) = NamedGanesha::start("csi2", &[]) else {
        return;
    };
    let p = Plugin::start(&[]).await;
    let doomed = create(&p, "doomed", soft_named_params(&g2)).await.unwrap();
    let healthy = create(&p, &unique("healthy"), ganesha_params(&g, &[]))
        .await
        .unwrap();
    let healthy2 = create(&p, &unique("healthy2"), ganesha_params(&g, &[]))
        .await
        .unwrap();
    let td = p.target("doomed");
    let th = p.target("healthy");
    let th2 = p.target("healthy2");
    publish(&p, &doomed, &td, false).await.unwrap();
    publish(&p, &healthy, &th, false).await.unwrap();
    publish(&p, &healthy2, &th2, false).await.unwrap();
    let (a, b, b2) = (td.clone(), th.clone(), th2.clone());
    within(Duration::from_secs(20), move || {
        std::fs::write(a.join("f"), b"d").unwrap();
        std::fs::write(b.join("f"), b"h").unwrap();
        std::fs::write(b2.join("f"), b"h2").unwrap();
    })
    .await;

    // Each mount process holds its own TCP connections, also the two on
    // the same server: no socket is shared between processes, and each has
    // an ESTABLISHED connection of its own to the server's NFS port.
    let nfs_port = g.nfs_port;
    let mut seen_inodes: Vec<u64> = Vec::new();
    let mut seen_ports: Vec<u16> = Vec::new();
    for (t, server_port) in [(&td, g2.nfs_port), (&th, nfs_port), (&th2, nfs_port)] {
        let pid = one_mount_pid(t);
        let conns = tcp_conns(pid);
        let nfs: Vec<&TcpConn> = conns
            .iter()
            .filter(|c| c.state == 1 && c.remote_port == server_port)
            .collect();
        eprintln!(
            "mount process {pid} ({}): NFS connections {nfs:?}",
            t.display()
        );
        assert!(
            !nfs.is_empty(),
            "{}: no NFS connection of its own: {conns:?}",
            t.display()
        );
        for ino in socket_inodes(pid) {
            assert!(
                !seen_inodes.contains(&ino),
                "socket {ino} shared between mount processes"
            );
            seen_inodes.push(ino);
        }
        for c in nfs {
            assert!(!seen_ports.contains(&c.local_port), "{c:?} shared");
            seen_ports.push(c.local_port);
        }
    }

    g2.stop();
    // The healthy volume keeps working while the other server is down.
    let (b, b2) = (th.clone(), th2.clone());
    within(Duration::from_secs(10), move || {
        for i in 0..20 {
            for d in [&b, &b2] {
                let f = d.join(format!("during-{i}"));
                std::fs::write(&f, b"still fine").unwrap();
                assert_eq!(std::fs::read(&f).unwrap(), b"still fine");
            }
        }
    })
    .await;
    // The dead server's volume fails (soft mount) instead of hanging forever.
    let a = td.clone();
    let r = within(Duration::from_secs(30), move || std::fs::read(a.join("f"))).await;
    assert!(r.is_err() || r.as_deref().ok() == Some(&b"d"[..]), "{r:?}");

    // Unpublish of the dead server's volume completes.
    let t = Instant::now();
    unpublish(&p, &doomed.volume_id, &td).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(!td.exists());
    // DeleteVolume against the stopped server: retryable error, in seconds.
    let t = Instant::now();
    let e = delete(&p, &doomed.volume_id).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(8));
    unpublish(&p, &healthy.volume_id, &th).await.unwrap();
    delete(&p, &healthy.volume_id).await.unwrap();
    unpublish(&p, &healthy2.volume_id, &th2).await.unwrap();
    delete(&p, &healthy2.volume_id).await.unwrap();
}
