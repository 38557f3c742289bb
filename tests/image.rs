//! The container image's build context (issue 13): the release binary builds from
//! exactly the files the Dockerfile copies into its build stage, offline and `--locked`,
//! and runs. (No image builder runs here; this is the part of `docker build` that
//! depends on the repository.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One `COPY`: its sources and its destination.
type Copy = (Vec<String>, String);

/// The build stage's `WORKDIR`, its `COPY`s, and its `RUN`s.
fn build_stage(dockerfile: &str) -> (String, Vec<Copy>, Vec<String>) {
    let mut workdir = String::from("/");
    let mut copies = Vec::new();
    let mut runs = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("FROM") => {
                stages += 1;
                if stages > 1 {
                    break;
                }
            }
            Some("WORKDIR") => workdir = words.next().unwrap().to_string(),
            Some("COPY") => {
                let args: Vec<String> = words.map(str::to_string).collect();
                assert!(!args.iter().any(|a| a.starts_with("--")), "{line}");
                let (dest, srcs) = args.split_last().unwrap();
                copies.push((srcs.to_vec(), dest.clone()));
            }
            Some("RUN") => runs.push(line.to_string()),
            _ => {}
        }
    }
    (workdir, copies, runs)
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_dockerfile_build_context_builds_the_binary_offline() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let (workdir, copies, runs) = build_stage(&dockerfile);
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "{runs:?}"
    );
    let ctx = tempfile::tempdir().unwrap();
    let root = ctx.path();
    for (srcs, dest) in &copies {
        let dest = if dest.starts_with('/') {
            PathBuf::from(dest)
        } else {
            Path::new(&workdir).join(dest)
        };
        let dest = root.join(dest.strip_prefix("/").unwrap());
        for s in srcs {
            let from = Path::new(ROOT).join(s);
            assert!(from.exists(), "COPY {s}: not in the repository");
            let to = if srcs.len() > 1 || dest.to_str().unwrap().ends_with('/') {
                dest.join(Path::new(s).file_name().unwrap())
            } else {
                dest.clone()
            };
            copy_tree(&from, &to);
        }
    }
    let src = root.join(workdir.trim_start_matches('/'));
    // A target directory of its own (the outer cargo holds the main one), kept between
    // runs so only changed code is rebuilt.
    let target = Path::new(ROOT).join("target").join("image-context");
    // What is checked is the context, not the optimizer: the release profile without
    // optimization or LTO builds in a third of the time on a 2-core CI machine.
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--locked",
            "--offline",
            "--bin",
            "svidcar",
        ])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the build context is incomplete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = Command::new(target.join("release/svidcar"))
        .arg("version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("svidcar {}", env!("CARGO_PKG_VERSION"))
    );
    // The runtime stage: the binary where ENTRYPOINT says, non-root 1337, iptables in.
    let runtime = dockerfile.split("\nFROM ").nth(2).unwrap();
    assert!(
        runtime.contains("COPY --from=build /src/target/release/svidcar /usr/local/bin/svidcar")
    );
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/svidcar\"]"));
    assert!(runtime.contains("USER 1337"));
    assert!(runtime.contains("iptables"));
}
