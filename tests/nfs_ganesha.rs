//! Every NFSv3 procedure against a real nfs-ganesha (started by scripts/test.sh).

mod common;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

use common::*;
use csi_nfs_fuse::nfs::client::{readdirplus_all, sattr_mode, sattr_none};
use csi_nfs_fuse::nfs::{CookieVerf, FileHandle, FileType, NfsSession, StableHow};
use csi_nfs_fuse::rpc::RpcConfig;
use nfs3_types::nfs3::{Nfs3Option, createhow3, createverf3, nfsstat3, sattr3};

async fn setup(name: &str) -> Option<(Ganesha, std::path::PathBuf, NfsSession, FileHandle)> {
    let g = ganesha()?;
    let (dir, rel) = g.test_dir(name);
    let s = g.mount(RpcConfig::default()).await;
    let fh = s
        .nfs
        .lookup(&root_cred(), &s.root, rel.as_bytes())
        .await
        .unwrap()
        .fh;
    Some((g, dir, s, fh))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_modes_write_commit_read_and_attributes() {
    let Some((_g, dir, s, d)) = setup("create").await else {
        return;
    };
    let c = root_cred();
    // UNCHECKED twice succeeds; GUARDED on an existing name fails with EXIST.
    let f = s
        .nfs
        .create(&c, &d, b"u", createhow3::UNCHECKED(sattr_mode(0o640)))
        .await
        .unwrap();
    let fh = f.fh.clone().expect("ganesha returns the handle");
    assert_eq!(f.attr.unwrap().mode & 0o7777, 0o640);
    s.nfs
        .create(&c, &d, b"u", createhow3::UNCHECKED(sattr_none()))
        .await
        .unwrap();
    let e = s
        .nfs
        .create(&c, &d, b"u", createhow3::GUARDED(sattr_none()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(nfsstat3::NFS3ERR_EXIST));
    // EXCLUSIVE: a retry with the same verifier succeeds, another one fails.
    let v = createverf3(*b"verf0001");
    let x = s
        .nfs
        .create(&c, &d, b"x", createhow3::EXCLUSIVE(v))
        .await
        .unwrap();
    let x2 = s
        .nfs
        .create(&c, &d, b"x", createhow3::EXCLUSIVE(v))
        .await
        .unwrap();
    assert_eq!(x.fh, x2.fh);
    let e = s
        .nfs
        .create(
            &c,
            &d,
            b"x",
            createhow3::EXCLUSIVE(createverf3(*b"verf0002")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(nfsstat3::NFS3ERR_EXIST));

    // WRITE UNSTABLE, COMMIT with a matching verifier, READ back.
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 241) as u8).collect();
    let mut verfs = HashSet::new();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        let w = s
            .nfs
            .write(&c, &fh, (i << 20) as u64, chunk, StableHow::Unstable)
            .await
            .unwrap();
        assert_eq!(w.count as usize, chunk.len());
        verfs.insert(w.verf);
    }
    let commit = s.nfs.commit(&c, &fh, 0, 0).await.unwrap();
    assert!(
        verfs.len() == 1 && verfs.contains(&commit.verf),
        "verifier stable while the server runs"
    );
    let mut back = Vec::new();
    loop {
        let r = s
            .nfs
            .read(&c, &fh, back.len() as u64, 1 << 20)
            .await
            .unwrap();
        back.extend_from_slice(&r.data);
        if r.eof {
            break;
        }
    }
    assert_eq!(back, data);
    assert_eq!(
        std::fs::read(dir.join("u")).unwrap(),
        data,
        "bytes are on the server's disk"
    );

    // GETATTR and SETATTR (size, mode) with a ctime guard.
    let a = s.nfs.getattr(&c, &fh).await.unwrap().attr;
    assert_eq!((a.ftype, a.size), (FileType::Regular, data.len() as u64));
    let set = sattr3 {
        size: Nfs3Option::Some(10),
        mode: Nfs3Option::Some(0o600),
        ..Default::default()
    };
    s.nfs.setattr(&c, &fh, set, Some(a.ctime)).await.unwrap();
    let stale_guard = sattr3 {
        size: Nfs3Option::Some(5),
        ..Default::default()
    };
    let e = s
        .nfs
        .setattr(&c, &fh, stale_guard, Some(a.ctime))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(nfsstat3::NFS3ERR_NOT_SYNC));
    let md = std::fs::metadata(dir.join("u")).unwrap();
    assert_eq!((md.len(), md.mode() & 0o7777), (10, 0o600));

    // ACCESS, FSSTAT, FSINFO, PATHCONF.
    let acc = s.nfs.access(&c, &fh, 0x3f).await.unwrap();
    assert!(acc.access & 1 != 0, "root may read");
    let st = s.nfs.fsstat(&c, &s.root).await.unwrap();
    assert!(st.tbytes > 0 && st.tbytes >= st.fbytes);
    let fi = s.nfs.fsinfo(&c, &s.root).await.unwrap();
    assert!(fi.rtmax >= 4096 && fi.wtmax >= 4096);
    assert!(s.rsize <= 1 << 20 && s.rsize <= fi.rtmax);
    let pc = s.nfs.pathconf(&c, &s.root).await.unwrap();
    assert!(pc.name_max >= 255);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_operations() {
    let Some((_g, dir, s, d)) = setup("names").await else {
        return;
    };
    let c = root_cred();
    let sub = s
        .nfs
        .mkdir(&c, &d, b"sub", sattr_mode(0o755))
        .await
        .unwrap()
        .fh
        .unwrap();
    let f = s
        .nfs
        .create(&c, &sub, b"a", createhow3::UNCHECKED(sattr_none()))
        .await
        .unwrap()
        .fh
        .unwrap();
    s.nfs
        .write(&c, &f, 0, b"hello", StableHow::FileSync)
        .await
        .unwrap();

    // LINK bumps nlink; RENAME replaces a target; REMOVE.
    let l = s.nfs.link(&c, &f, &d, b"hard").await.unwrap();
    assert_eq!(l.attr.unwrap().nlink, 2);
    s.nfs
        .create(&c, &d, b"victim", createhow3::UNCHECKED(sattr_none()))
        .await
        .unwrap();
    s.nfs.rename(&c, &d, b"hard", &d, b"victim").await.unwrap();
    assert_eq!(std::fs::read(dir.join("victim")).unwrap(), b"hello");
    assert!(!dir.join("hard").exists());
    s.nfs.remove(&c, &d, b"victim").await.unwrap();
    assert_eq!(s.nfs.getattr(&c, &f).await.unwrap().attr.nlink, 1);

    // SYMLINK + READLINK.
    let sl = s
        .nfs
        .symlink(&c, &d, b"ln", b"sub/a", sattr_none())
        .await
        .unwrap()
        .fh
        .unwrap();
    assert_eq!(&s.nfs.readlink(&c, &sl).await.unwrap().target[..], b"sub/a");
    assert_eq!(
        std::fs::read_link(dir.join("ln")).unwrap().to_str(),
        Some("sub/a")
    );

    // LOOKUP of a missing name, RMDIR of a non-empty then empty directory.
    let e = s.nfs.lookup(&c, &d, b"nope").await.unwrap_err();
    assert_eq!(e.status(), Some(nfsstat3::NFS3ERR_NOENT));
    let e = s.nfs.rmdir(&c, &d, b"sub").await.unwrap_err();
    assert_eq!(e.status(), Some(nfsstat3::NFS3ERR_NOTEMPTY));
    s.nfs.remove(&c, &sub, b"a").await.unwrap();
    s.nfs.rmdir(&c, &d, b"sub").await.unwrap();
    assert!(!dir.join("sub").exists());

    // READDIR sees what is left.
    let r = s
        .nfs
        .readdir(&c, &d, 0, CookieVerf::default(), 8192)
        .await
        .unwrap();
    let names: HashSet<&[u8]> = r.entries.iter().map(|e| e.name.as_ref()).collect();
    assert!(names.contains(b"ln".as_slice()) && !names.contains(b"victim".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdirplus_of_10000_entries_through_cookies() {
    let Some((_g, dir, s, d)) = setup("big").await else {
        return;
    };
    for i in 0..10_000 {
        std::fs::write(dir.join(format!("f{i:05}")), b"").unwrap();
    }
    let c = root_cred();
    // A small maxcount forces many pages, each continuing from a cookie.
    let all = readdirplus_all(&s.nfs, &c, &d, 8192).await.unwrap();
    let mut names = HashSet::new();
    for e in &all {
        let n = String::from_utf8(e.name.to_vec()).unwrap();
        assert!(names.insert(n.clone()), "{n} listed twice");
        if n != "." && n != ".." {
            assert!(
                e.attr.is_some() && e.fh.is_some(),
                "{n} came without attributes or handle"
            );
        }
    }
    for i in 0..10_000 {
        assert!(names.contains(&format!("f{i:05}")), "f{i:05} missing");
    }
    assert_eq!(names.iter().filter(|n| n.starts_with('f')).count(), 10_000);
}

/// `csi-nfs-fuse cp` both ways, with a size that is no multiple of wsize
/// nor of four (the last WRITE's XDR padding), checked byte for byte on
/// the server's disk and after the copy back.
#[test]
fn cp_copies_to_and_from_the_server_byte_for_byte() {
    let Some(g) = ganesha() else { return };
    let (dir, rel) = g.test_dir("cp");
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    let data: Vec<u8> = (0..(5 << 20) + 4099u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let remote = g.source(&format!("{rel}/copy"));
    let cp = |from: &std::path::Path, to: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_csi-nfs-fuse"))
            .arg("cp")
            .arg(from)
            .arg(to)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cp {from:?} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cp(&src, &remote);
    assert!(
        std::fs::read(dir.join("copy")).unwrap() == data,
        "server copy differs"
    );
    let back = local.path().join("back");
    cp(std::path::Path::new(&remote), back.to_str().unwrap());
    assert!(std::fs::read(&back).unwrap() == data, "copy back differs");
}
