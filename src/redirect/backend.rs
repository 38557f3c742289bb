//! The iptables backends (`legacy`, `nft`): finding their binaries, choosing one
//! by detection, and running `-save` and `-restore`. Detection only ever runs the
//! legacy `-save` without `-t`, which lists tables but never creates one: any other
//! legacy command creates the table, and the next detection would then see legacy
//! "in use" (the self-priming bug Istio had, istio/istio#61020).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use super::rules::Family;

/// An iptables backend: the kernel interface the `iptables-*` binaries talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-legacy` (x_tables): the one to use when the node already uses it.
    Legacy,
    /// `iptables-nft` (nf_tables): the default on current distributions.
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// `iptables-nft-restore` and the like.
    pub fn binary(self, family: Family, tool: Tool) -> String {
        format!("{}-{}-{}", family.tool(), self.name(), tool.suffix())
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of a backend's binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Save,
    Restore,
}

impl Tool {
    fn suffix(self) -> &'static str {
        match self {
            Tool::Save => "save",
            Tool::Restore => "restore",
        }
    }
}

/// What went wrong running the iptables binaries.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{} not found in PATH ({path}): install iptables (Debian: apt-get install iptables)", .binaries.join(", "))]
    NotFound { binaries: Vec<String>, path: String },
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} failed ({status}): {stderr}{hint}", hint = permission_hint(.stderr))]
    Failed {
        binary: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// Not being root is the usual reason; say so next to the tool's own words.
fn permission_hint(stderr: &str) -> &'static str {
    if stderr.contains("ermission denied") || stderr.contains("Operation not permitted") {
        " (svidcar redirect must run as root, or with CAP_NET_ADMIN and CAP_NET_RAW)"
    } else {
        ""
    }
}

/// `name` in the directories of `PATH`, if there and executable.
pub fn find(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The PATH for messages.
fn path_var() -> String {
    std::env::var("PATH").unwrap_or_default()
}

/// The absolute paths of every binary `tools` of `backend` in both families, or one
/// error naming all that are missing: checked before anything is applied, so a
/// missing `ip6tables` never leaves IPv4 rules behind.
pub fn binaries(backend: Backend, tools: &[Tool]) -> Result<Binaries, BackendError> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for family in Family::ALL {
        for tool in tools {
            let name = backend.binary(family, *tool);
            match find(&name) {
                Some(p) => found.push((family, *tool, p)),
                None => missing.push(name),
            }
        }
    }
    if !missing.is_empty() {
        return Err(BackendError::NotFound {
            binaries: missing,
            path: path_var(),
        });
    }
    Ok(Binaries { backend, found })
}

/// A backend's binaries, found in PATH.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub backend: Backend,
    found: Vec<(Family, Tool, PathBuf)>,
}

impl Binaries {
    fn get(&self, family: Family, tool: Tool) -> Result<&Path, BackendError> {
        self.found
            .iter()
            .find(|(f, t, _)| *f == family && *t == tool)
            .map(|(_, _, p)| p.as_path())
            .ok_or_else(|| BackendError::NotFound {
                binaries: vec![self.backend.binary(family, tool)],
                path: path_var(),
            })
    }

    /// `<tool>-<backend>-save` with no `-t`: every table there is, creating none.
    pub fn save(&self, family: Family) -> Result<String, BackendError> {
        run(self.get(family, Tool::Save)?, &[], None)
    }

    /// `<tool>-<backend>-restore --noflush -w 10` fed `input`: one transaction that
    /// leaves the tables and rules it does not name alone; waits up to 10 s for the
    /// xtables lock (legacy's lock is shared by every network namespace).
    pub fn restore(&self, family: Family, input: &str) -> Result<(), BackendError> {
        run(
            self.get(family, Tool::Restore)?,
            &["--noflush", "-w", "10"],
            Some(input),
        )
        .map(|_| ())
    }
}

/// Runs `bin` with `args`, feeding `input`; its stdout when it exits 0.
fn run(bin: &Path, args: &[&str], input: Option<&str>) -> Result<String, BackendError> {
    let binary = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| bin.display().to_string());
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BackendError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // restore reads all of its input before it writes anything, so writing first
        // cannot deadlock; a write error shows up as the tool's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| BackendError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(BackendError::Failed {
            binary,
            status: out.status,
            // One line: the tools split their complaint over several.
            stderr: String::from_utf8_lossy(&out.stderr)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Chooses the backend when `--backend` is not given: legacy if the legacy tables
/// of this network namespace hold a rule (`-A` line) in either family, else nft.
/// Returns the backend and the reason, for the one log line. Empty legacy tables do
/// not count: their chain declarations are no sign of use (istio/istio#56983).
pub fn detect() -> Result<(Backend, String), BackendError> {
    let mut counts = Vec::new();
    for family in Family::ALL {
        let name = Backend::Legacy.binary(family, Tool::Save);
        let Some(bin) = find(&name) else {
            counts.push(format!("{name} is not in PATH"));
            continue;
        };
        let dump = run(&bin, &[], None)?;
        let n = dump.lines().filter(|l| l.starts_with("-A ")).count();
        if n > 0 {
            let rules = if n == 1 { "rule" } else { "rules" };
            return Ok((
                Backend::Legacy,
                format!("{name} lists {n} {rules} in this network namespace"),
            ));
        }
        counts.push(format!("{name} lists no rules"));
    }
    Ok((
        Backend::Nft,
        format!(
            "no legacy rules in this network namespace ({})",
            counts.join(", ")
        ),
    ))
}
