//! The `svidcar` binary: everything lives in the library; see `svidcar::cli`.

fn main() -> std::process::ExitCode {
    svidcar::cli::main()
}
