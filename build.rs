//! Compiles the CSI v1.9.0 protocol (proto/csi.proto) into tonic/prost code,
//! server and client, with the vendored protoc so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // RPCs we do not implement answer UNIMPLEMENTED, as the spec asks.
        .generate_default_stubs(true)
        .compile_protos(
            &[std::path::PathBuf::from("proto/csi.proto")],
            &[std::path::PathBuf::from("proto"), well_known],
        )?;
    Ok(())
}
