//! The code under src/proto/generated is what tonic-prost-build makes of proto/ now.
//!
//! The generated code is checked in (see src/proto/mod.rs for why); this test
//! regenerates it into a temporary directory and fails, naming the file, when a .proto
//! or the generator changed and the checked-in code did not follow. With
//! `SVIDCAR_PROTO_WRITE=1` it rewrites src/proto/generated instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const PROTOS: [&str; 3] = [
    "proto/workload.proto",
    "proto/envoy/service/secret/v3/sds.proto",
    "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// File name -> contents of every `.rs` file in `dir`.
fn rust_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn checked_in_code_is_what_the_protos_generate() {
    let root = root();
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&protos, [root.join("proto")]).expect("proto/ compiles");
    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("code generation");
    let fresh = rust_files(out.path());
    let checked_in_dir = root.join("src/proto/generated");
    if std::env::var_os("SVIDCAR_PROTO_WRITE").is_some() {
        for old in rust_files(&checked_in_dir).keys() {
            std::fs::remove_file(checked_in_dir.join(old)).unwrap();
        }
        for (name, text) in &fresh {
            std::fs::write(checked_in_dir.join(name), text).unwrap();
        }
        return;
    }
    let checked_in = rust_files(&checked_in_dir);
    assert_eq!(
        fresh.keys().collect::<Vec<_>>(),
        checked_in.keys().collect::<Vec<_>>(),
        "src/proto/generated has other files than proto/ generates \
         (SVIDCAR_PROTO_WRITE=1 cargo test --test proto_generated rewrites it)"
    );
    for (name, text) in &fresh {
        assert!(
            checked_in[name] == *text,
            "src/proto/generated/{name} differs from what proto/ generates now \
             (SVIDCAR_PROTO_WRITE=1 cargo test --test proto_generated rewrites it)"
        );
    }
}
