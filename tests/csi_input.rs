//! Bad input over the CSI socket: missing, oversized and malformed fields
//! get the spec's codes (INVALID_ARGUMENT mostly), and volume ids or subDirs
//! that try to leave `<share>/<subDir>` are refused without touching the
//! server.

mod common;
mod csi_common;

use csi_common::*;

/// A map of `n` bytes (keys plus values) that is otherwise harmless.
fn big_map(n: usize) -> HashMap<String, String> {
    kv(&[("pad", &"x".repeat(n - 3))])
}

/// Parameters that pass validation but point at a closed port, so a call
/// that gets past the size checks fails quickly with UNAVAILABLE.
fn offline_params() -> HashMap<String, String> {
    kv(&[
        ("server", "127.0.0.1"),
        ("share", "/export"),
        ("mountOptions", "port=1,mountport=1"),
    ])
}

fn offline_volume(sub_dir: &str) -> Volume {
    Volume {
        volume_id: VolumeRef {
            server: "127.0.0.1".into(),
            share: "/export".into(),
            sub_dir: sub_dir.into(),
            on_delete: OnDelete::Delete,
            port: Some(1),
            mountport: Some(1),
        }
        .encode()
        .unwrap(),
        ..Default::default()
    }
}

fn flags_cap(flags: Vec<String>, fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            mount_flags: flags,
            volume_mount_group: String::new(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_invalid_argument() {
    let p = Plugin::start(&[]).await;
    let c = || p.controller();
    let n = || p.node();
    let frame = "v1#127.0.0.1#/export##delete";
    let id129 = format!(
        "v1#127.0.0.1#/export#{}#delete",
        "s".repeat(129 - frame.len())
    );
    assert_eq!(id129.len(), 129);

    // CreateVolume: name at 128 bytes passes the size check (it then fails
    // to reach the closed port), at 129 it does not.
    let mut r = create_req(&"n".repeat(128), offline_params());
    r.parameters.insert("subDir".into(), "short".into());
    assert_code(c().create_volume(r).await, Code::Unavailable, "");
    let r = create_req(&"n".repeat(129), offline_params());
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "name is 129 bytes",
    );
    // Multi-byte characters count in bytes: 65 × 2 = 130.
    let r = create_req(&"é".repeat(65), offline_params());
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "name is 130 bytes",
    );
    // Maps: parameters, secrets, mutable_parameters at 4 KiB + 1.
    let mut r = create_req("v", offline_params());
    r.parameters.extend(big_map(4097));
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "parameters is",
    );
    let mut r = create_req("v", offline_params());
    r.secrets = big_map(4097);
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "secrets is 4097 bytes",
    );
    let mut r = create_req("v", offline_params());
    r.mutable_parameters = big_map(4097);
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "mutable_parameters is 4097 bytes",
    );
    // Exactly 4 KiB of secrets is fine (they are ignored: AUTH_SYS).
    let mut r = create_req("v", offline_params());
    r.secrets = big_map(4096);
    assert_code(c().create_volume(r).await, Code::Unavailable, "");
    // Capabilities: fs_type over 128, mount_flags over 4 KiB in total.
    let mut r = create_req("v", offline_params());
    r.volume_capabilities = vec![flags_cap(vec![], &"f".repeat(129))];
    assert_code(c().create_volume(r).await, Code::InvalidArgument, "fs_type");
    let mut r = create_req("v", offline_params());
    r.volume_capabilities = vec![flags_cap(vec!["noac".repeat(25); 41], "")];
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "mount_flags is 4100 bytes in total",
    );
    let mut r = create_req("v", offline_params());
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: big_map(5000),
        }],
        preferred: vec![],
    });
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "accessibility_requirements",
    );

    // DeleteVolume: an id over 128 bytes is invalid (not "unknown, OK").
    assert_code(
        delete(&p, &id129).await,
        Code::InvalidArgument,
        "volume_id is 129 bytes",
    );
    assert_code(
        c().delete_volume(DeleteVolumeRequest {
            volume_id: "fake-vol-id-1".into(),
            secrets: big_map(4097),
        })
        .await,
        Code::InvalidArgument,
        "secrets",
    );

    // ValidateVolumeCapabilities.
    let vol = offline_volume("v");
    assert_code(
        validate(&p, &id129, vec![mount_cap(Mode::SingleNodeWriter)]).await,
        Code::InvalidArgument,
        "volume_id is 129",
    );
    for (field, req) in [
        (
            "volume_context",
            ValidateVolumeCapabilitiesRequest {
                volume_context: big_map(4097),
                ..Default::default()
            },
        ),
        (
            "parameters",
            ValidateVolumeCapabilitiesRequest {
                parameters: big_map(4097),
                ..Default::default()
            },
        ),
        (
            "secrets",
            ValidateVolumeCapabilitiesRequest {
                secrets: big_map(4097),
                ..Default::default()
            },
        ),
    ] {
        let req = ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..req
        };
        assert_code(
            c().validate_volume_capabilities(req).await,
            Code::InvalidArgument,
            field,
        );
    }

    // GetCapacity.
    assert_code(
        c().get_capacity(GetCapacityRequest {
            parameters: big_map(4097),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "parameters is 4097",
    );

    // NodePublishVolume: id, maps, paths (PATH_MAX, not 128: a 300-byte
    // target passes the size check and the call fails on the closed port).
    let target = p.target("t");
    let mut r = publish_req(&vol, &target, false);
    r.volume_id = id129.clone();
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "volume_id is 129 bytes",
    );
    for (field, edit) in [
        (
            "volume_context",
            (|r: &mut NodePublishVolumeRequest| r.volume_context = big_map(4097))
                as fn(&mut NodePublishVolumeRequest),
        ),
        ("publish_context", |r| r.publish_context = big_map(4097)),
        ("secrets", |r| r.secrets = big_map(4097)),
        ("target_path", |r| {
            r.target_path = format!("/tmp/{}", "p".repeat(4100))
        }),
        ("staging_target_path", |r| {
            r.staging_target_path = format!("/tmp/{}", "p".repeat(4100))
        }),
        ("fs_type", |r| {
            r.volume_capability = Some(flags_cap(vec![], &"x".repeat(129)))
        }),
        ("mount_flags", |r| {
            r.volume_capability = Some(flags_cap(vec!["a".repeat(4097)], ""))
        }),
    ] {
        let mut r = publish_req(&vol, &target, false);
        edit(&mut r);
        assert_code(
            n().node_publish_volume(r).await,
            Code::InvalidArgument,
            field,
        );
    }
    assert!(!target.exists(), "nothing created for refused requests");
    let long = format!("{0}/{0}/{0}", "d".repeat(100));
    let long_target = p.target(&long);
    assert!(long_target.to_string_lossy().len() > 300);
    assert_code(
        publish(&p, &vol, &long_target, false).await,
        Code::Unavailable,
        "mount failed",
    );
    let _ = std::fs::remove_dir_all(p.target(&"d".repeat(100)));

    // NodeUnpublishVolume and NodeGetVolumeStats.
    assert_code(
        unpublish(&p, &id129, &target).await,
        Code::InvalidArgument,
        "volume_id is 129",
    );
    assert_code(
        unpublish(&p, &vol.volume_id, &PathBuf::from("/".repeat(4100))).await,
        Code::InvalidArgument,
        "target_path is 4100 bytes",
    );
    assert_code(
        stats(&p, &id129, "/tmp").await,
        Code::InvalidArgument,
        "volume_id is 129",
    );
    assert_code(
        stats(&p, &vol.volume_id, &"/".repeat(4100)).await,
        Code::InvalidArgument,
        "volume_path is 4100",
    );

    // node_id: 256 bytes is allowed, 257 is refused at start.
    drop(p);
    let id256 = "n".repeat(256);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("node-id.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
        .args(["plugin", "--node-id", &id256, "--endpoint"])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let ch = loop {
        if let Ok(ch) = connect(&sock).await {
            break ch;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "plugin did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let info = NodeClient::new(ch)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, id256);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    let out = Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
        .args(["plugin", "--endpoint", "/tmp/csi-never.sock", "--node-id"])
        .arg("n".repeat(257))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("256"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_fields_get_the_spec_codes() {
    let p = Plugin::start(&[]).await;
    let c = || p.controller();
    let n = || p.node();
    let vol = offline_volume("v");
    let target = p.target("m");

    // An access mode number outside the enum.
    let mut r = create_req("v", offline_params());
    r.volume_capabilities[0].access_mode = Some(AccessMode { mode: 99 });
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "access mode 99",
    );
    let mut r = publish_req(&vol, &target, false);
    r.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode { mode: -1 });
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "access mode",
    );
    // Capacity: negative is invalid; required > limit is OUT_OF_RANGE.
    let mut r = create_req("v", offline_params());
    r.capacity_range = Some(CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "negative",
    );
    // Content sources are not supported.
    let mut r = create_req("v", offline_params());
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "snap".into(),
            },
        )),
    });
    assert_code(
        c().create_volume(r).await,
        Code::InvalidArgument,
        "volume_content_source",
    );
    // Parameter values.
    for (k, v, needle) in [
        ("mountPermissions", "0o99", "octal"),
        ("mountPermissions", "17777", "octal"),
        ("onDelete", "", "expected delete"),
        ("mountOptions", "vers=4", "vers"),
        ("mountOptions", "port=70000", "port"),
        ("server", "", "'server' is required"),
        ("server", "host/name", "server"),
        ("server", "bad\nhost", "server"),
        ("share", "relative", "absolute"),
        ("share", "/a\0b", "NUL"),
    ] {
        let mut params = offline_params();
        params.insert(k.into(), v.into());
        assert_code(create(&p, "v", params).await, Code::InvalidArgument, needle);
    }
    // Mount flags are an -o list, checked by name.
    let mut r = create_req("v", offline_params());
    r.volume_capabilities = vec![flags_cap(vec!["nosuch=1".into()], "")];
    assert_code(c().create_volume(r).await, Code::InvalidArgument, "nosuch");
    let mut r = publish_req(&vol, &target, false);
    r.volume_capability = Some(flags_cap(vec!["rsize=banana".into()], ""));
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "rsize",
    );
    // A volume_context that contradicts the id.
    let mut r = publish_req(&vol, &target, false);
    r.volume_context = kv(&[("subDir", "../other")]);
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "does not match",
    );
    let mut r = publish_req(&vol, &target, false);
    r.volume_context = kv(&[("mountOptions", "bogus")]);
    assert_code(
        n().node_publish_volume(r).await,
        Code::InvalidArgument,
        "bogus",
    );
    // Target paths: relative, NUL, `..`.
    for (bad, needle) in [
        ("relative/t", "absolute"),
        ("/tmp/a\0b", "NUL"),
        ("/tmp/x/../../etc/t", "'..'"),
    ] {
        let mut r = publish_req(&vol, &target, false);
        r.target_path = bad.into();
        assert_code(
            n().node_publish_volume(r).await,
            Code::InvalidArgument,
            needle,
        );
        assert_code(
            n().node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: bad.into(),
            })
            .await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert!(!target.exists());
    // Ids that are not ours: NOT_FOUND where the volume must exist, OK
    // from DeleteVolume.
    for id in [
        "fake-vol-id-1",
        "v1#",
        "v1#h#/e#s#delete#port=x",
        "v2#h#/e#s#delete",
    ] {
        let fake = Volume {
            volume_id: id.into(),
            ..Default::default()
        };
        assert_code(publish(&p, &fake, &target, false).await, Code::NotFound, "");
        assert_code(
            validate(&p, id, vec![mount_cap(Mode::SingleNodeWriter)]).await,
            Code::NotFound,
            "",
        );
        delete(&p, id).await.unwrap();
    }
    // The plugin is still healthy after all of it.
    assert_eq!(
        p.identity()
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
}

/// Volume ids and subDirs with `..`, absolute paths, NUL bytes or empty
/// components, in every request that takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_in_ids_and_sub_dirs_is_refused() {
    let p = Plugin::start(&[]).await;
    let g = ganesha();
    let (host, export) = match &g {
        Some(g) => (g.host.clone(), g.export.clone()),
        None => ("127.0.0.1".to_string(), "/export".to_string()),
    };
    let bad_sub_dirs = [
        "..",
        "../x",
        "x/..",
        "a/../b",
        "a/../../..",
        "/abs",
        "/",
        "a//b",
        "a/",
        "//",
        "",
        ".",
        "./a",
        "a/.",
        "a\0b",
        "\0",
    ];
    // CreateVolume: explicit subDir, and the name as the default subDir.
    for sub in bad_sub_dirs {
        let mut params = kv(&[("server", &host), ("share", &export)]);
        params.insert("subDir".into(), sub.into());
        assert_code(
            create(&p, "v", params).await,
            Code::InvalidArgument,
            "subDir",
        );
    }
    for name in ["..", "a/../..", "/etc", "a\0b", "a//b"] {
        let params = kv(&[("server", &host), ("share", &export)]);
        assert_code(create(&p, name, params).await, Code::InvalidArgument, "");
    }
    for share in [
        "/export/..",
        "/export/../etc",
        "..",
        "export",
        "/a//b",
        "/a/./b",
        "/a\0",
    ] {
        let params = kv(&[("server", &host), ("share", share)]);
        assert_code(
            create(&p, "v", params).await,
            Code::InvalidArgument,
            "share",
        );
    }

    // Forged ids (as a CO or an attacker could send them).
    let canary_dir = g.as_ref().map(|g| {
        let d = g.dir.join(unique("canary"));
        std::fs::create_dir_all(d.join("victim")).unwrap();
        std::fs::write(d.join("canary.txt"), b"alive").unwrap();
        std::fs::write(d.join("victim/canary.txt"), b"alive").unwrap();
        d
    });
    let base = canary_dir
        .as_ref()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .unwrap_or_else(|| "base".into());
    let mut forged: Vec<String> = Vec::new();
    for sub in [
        format!("{base}/victim/.."),
        format!("{base}/.."),
        "..".into(),
        format!("../{base}"),
        format!("/{base}"),
        format!("{base}//victim"),
        format!("{base}/victim/"),
        format!("{base}/./victim"),
        format!("{base}\0"),
        String::new(),
        format!("{base}%2f..%2fvictim"),
        format!("{base}/%2e%2e"),
    ] {
        forged.push(format!("v1#{host}#{export}#{sub}#delete"));
    }
    for share in [
        format!("{export}/{base}/victim/.."),
        format!("{export}/.."),
        format!("{export}//{base}"),
        format!("{export}\0"),
        base.clone(),
    ] {
        forged.push(format!("v1#{host}#{share}#victim#delete"));
    }
    let target = p.target("forged");
    for id in &forged {
        // Over 128 bytes is INVALID_ARGUMENT before anything else.
        let (not_ours, delete_code) = if id.len() > 128 {
            (Code::InvalidArgument, Some(Code::InvalidArgument))
        } else {
            (Code::NotFound, None)
        };
        // DeleteVolume: not one of ours, so there is nothing to delete: OK.
        match (delete(&p, id).await, delete_code) {
            (Ok(()), None) => {}
            (Err(e), Some(code)) if e.code() == code => {}
            (r, _) => panic!("DeleteVolume {id:?}: {r:?}"),
        }
        let vol = Volume {
            volume_id: id.clone(),
            ..Default::default()
        };
        assert_code(publish(&p, &vol, &target, false).await, not_ours, "");
        assert!(!target.exists() && !is_mounted(&target), "{id:?}");
        assert_code(
            validate(&p, id, vec![mount_cap(Mode::SingleNodeWriter)]).await,
            not_ours,
            "",
        );
    }
    if let (Some(g), Some(d)) = (&g, &canary_dir) {
        assert_eq!(std::fs::read(d.join("canary.txt")).unwrap(), b"alive");
        assert_eq!(
            std::fs::read(d.join("victim/canary.txt")).unwrap(),
            b"alive"
        );
        assert!(g.dir.is_dir());
        std::fs::remove_dir_all(d).unwrap();
    }
    assert!(mount_pids(&target).is_empty());
}

/// `docker plugin set CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS=...` reaches every
/// publish, and a bad value is refused by name rather than mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_default_mount_options_apply_and_are_validated() {
    let Some(g) = common::ganesha() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let p = Plugin::start_with(
        dir,
        sock,
        &[],
        &[("CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS", "actimeo=7,nconnect=3")],
    )
    .await;
    let name = format!("defopts-{}", rand_suffix());
    let vol = create(&p, &name, ganesha_params(&g, &[])).await.unwrap();
    let target = p.target("defopts");
    publish(&p, &vol, &target, false).await.unwrap();
    let pid = mount_pids(&target)[0];
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("actimeo=7,nconnect=3"), "{cmdline}");
    unpublish(&p, &vol.volume_id, &target).await.unwrap();
    delete(&p, &vol.volume_id).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let p = Plugin::start_with(
        dir,
        sock,
        &[],
        &[("CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS", "frobnicate")],
    )
    .await;
    let vol = create(
        &p,
        &format!("defbad-{}", rand_suffix()),
        ganesha_params(&g, &[]),
    )
    .await
    .unwrap();
    let r = publish(&p, &vol, &p.target("defbad"), false).await;
    assert_code(
        r,
        tonic::Code::InvalidArgument,
        "CSI_NFS_FUSE_DEFAULT_MOUNT_OPTIONS",
    );
    // Said at start as well, where the operator enabling the plugin sees it.
    let log = p.log_text();
    let at_start = log
        .lines()
        .take_while(|l| !l.contains("CSI plugin listening"))
        .any(|l| l.contains("invalid plugin setting") && l.contains("frobnicate"));
    assert!(at_start, "{log}");
    delete(&p, &vol.volume_id).await.unwrap();
}
