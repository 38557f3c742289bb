//! Build step: gives the linker the binary's code layout. (The code generated from
//! proto/ is checked in under src/proto/generated; `tests/proto_generated.rs` keeps it
//! in step with proto/.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    link_args()
}

/// Linker arguments for the `svidcar` binary, where the linker is rustc's default rust-lld
/// (x86_64 Linux with glibc, Rust 1.90+); other targets link as they always did.
///
/// - `-z pack-relative-relocs`: the relative relocations of a position-independent binary
///   (800 KB of `.rela.dyn` here) stored as a compact bitmap (DT_RELR, glibc 2.36+, as
///   Debian bookworm has), so start-up reads a few KB instead.
/// - `--symbol-ordering-file`: the functions that start-up, an idle process and the common
///   traffic paths run (`scripts/symbol-order` records them), placed first and together.
///   The kernel maps 64 KiB of code around every page touched, so scattered start-up code
///   kept 8 MiB of a 13 MiB `.text` resident; packed, about 2.7 MiB.
fn link_args() -> Result<(), Box<dyn std::error::Error>> {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    println!("cargo:rerun-if-env-changed=SVIDCAR_LINK_LAYOUT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    // A build that chose its own linker may not have lld (GNU ld reads no symbol ordering
    // file); `SVIDCAR_LINK_LAYOUT=0` turns the layout off by hand.
    let own_linker = var("CARGO_ENCODED_RUSTFLAGS").contains("linker")
        || !var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty();
    if own_linker
        || var("SVIDCAR_LINK_LAYOUT") == "0"
        || var("CARGO_CFG_TARGET_ARCH") != "x86_64"
        || var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
    {
        return Ok(());
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    let order = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?)
        .join("build")
        .join("symbol-order.txt");
    println!("cargo:rerun-if-changed=build/symbol-order.txt");
    // A missing file would fail the link with lld's own message; say which file instead.
    if !order.is_file() {
        return Err(format!(
            "{} is missing (scripts/symbol-order makes it)",
            order.display()
        )
        .into());
    }
    // -Xlinker passes the path whole (-Wl, would split it at a comma).
    println!("cargo:rustc-link-arg-bins=-Xlinker");
    println!(
        "cargo:rustc-link-arg-bins=--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    Ok(())
}
