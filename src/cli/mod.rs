//! The command line: parses it (clap) and runs one subcommand. `run` hands over to
//! [`crate::app`]; the others are short and live here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};

use crate::app::{self, identity_error, init_logging};
use crate::config::{self, Config};
use crate::identity::{self, dev_ca, IdentitySource};
use crate::spiffe::parse_trust_domain;

mod client_errors;
mod inject;
mod sds_fetch;
mod wait;

use client_errors::call_error;

const WORKLOAD_API: &str = "the SPIFFE Workload API";

#[derive(Parser)]
#[command(name = "svidcar", version, about = "SPIFFE mTLS sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum WorkloadCall {
    /// Fetch JWT-SVIDs for an audience and print them, one per line: ID, token.
    Jwt {
        #[arg(long, required = true)]
        audience: Vec<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Print the JWT bundles (JWKS) per trust domain.
    JwtBundles,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short, env = "SVIDCAR_CONFIG")]
        config: PathBuf,
    },
    /// Wait until the local sidecar is ready (`GET /ready` answers 200), for images
    /// that cannot use native sidecars: `svidcar wait && exec app`.
    Wait {
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
        timeout: Duration,
        /// The sidecar's admin address (`svidcar inject` sets port 15020).
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: std::net::SocketAddr,
    },
    /// Validate a config (and load its identity) without running; exits non-zero on a problem.
    Check {
        #[arg(long, short, env = "SVIDCAR_CONFIG")]
        config: PathBuf,
    },
    /// Create a dev CA (certificate + PKCS#8 key) for `identity.dev.ca_cert`/`ca_key`.
    DevCa {
        /// The CA's key type, which its SVIDs share (SPIRE's `ca_key_type`):
        /// ec-p256, ec-p384 or rsa-2048.
        #[arg(long, default_value = "ec-p256")]
        key_type: identity::keys::KeyType,
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// How long the CA is valid, e.g. 8760h.
        #[arg(long, default_value = "8760h", value_parser = config::parse_duration)]
        lifetime: Duration,
        /// Replace an existing CA. Without it, existing files are left alone: other
        /// sidecars may trust that CA.
        #[arg(long)]
        force: bool,
    },
    /// Serve the SPIFFE Workload API from a dev CA (a stand-in for SPIRE Agent).
    DevAgent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Call a Workload API as a workload would (socket: --socket or SPIFFE_ENDPOINT_SOCKET).
    Workload {
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        #[command(subcommand)]
        call: WorkloadCall,
    },
    /// Fetch secrets from an SDS socket as Envoy would, and print them without keys.
    SdsFetch {
        /// unix:///path/to/sds.sock, unix:/path, /path or tcp://IP:PORT
        #[arg(long)]
        socket: String,
        /// Resource names (none: everything).
        names: Vec<String>,
    },
    /// Install the nat rules that send this network namespace's TCP traffic through
    /// svidcar's `transparent` listeners (run as root, e.g. in an init container).
    Redirect {
        /// Needed unless --cleanup.
        #[arg(
            long,
            short,
            env = "SVIDCAR_CONFIG",
            required_unless_present = "cleanup"
        )]
        config: Option<PathBuf>,
        /// The iptables backend; default: legacy if it already holds rules here, else nft.
        #[arg(long, value_enum)]
        backend: Option<crate::redirect::Backend>,
        /// Print the iptables-restore input(s) instead of applying them.
        #[arg(long)]
        dry_run: bool,
        /// Remove every rule and chain svidcar made (on whichever backend holds them).
        #[arg(long)]
        cleanup: bool,
    },
    /// Add the svidcar sidecar to Kubernetes workloads: YAML in, YAML out on stdout.
    Inject(inject::InjectArgs),
    /// Serve the mutating admission webhook that injects pods as `inject` does.
    Webhook {
        #[arg(long, short, env = "SVIDCAR_WEBHOOK_CONFIG")]
        config: PathBuf,
    },
    /// Print the version.
    Version,
}

/// Parses the command line and runs the subcommand; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => app::run(&config),
        Command::Check { config } => check(&config),
        Command::Wait { timeout, admin } => wait::run(admin, timeout),
        Command::DevCa {
            key_type,
            trust_domain,
            cert,
            key,
            lifetime,
            force,
        } => dev_ca(&trust_domain, &cert, &key, lifetime, key_type, force),
        Command::DevAgent { config } => dev_agent(&config),
        Command::Workload { socket, call } => workload_call(&socket, call),
        Command::SdsFetch { socket, names } => sds_fetch(&socket, names),
        Command::Redirect {
            config,
            backend,
            dry_run,
            cleanup,
        } => {
            init_logging(None);
            let opts = crate::redirect::Options {
                backend,
                dry_run,
                cleanup,
            };
            crate::redirect::run(config.as_deref(), opts)
        }
        Command::Inject(args) => inject::run(args),
        Command::Webhook { config } => {
            init_logging(None);
            crate::webhook::run(&config)
        }
        Command::Version => {
            println!("svidcar {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `svidcar check`: parse, validate, and load the identity once.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let identity = &config.identity;
    let id = IdentitySource::check(identity).map_err(|e| identity_error(e, identity))?;
    println!(
        "config OK: identity {id}, {} inbound, {} outbound listener(s)",
        config.count(true),
        config.count(false)
    );
    Ok(())
}

/// `svidcar dev-ca`: write a fresh CA so several dev sidecars can share a trust domain.
pub fn dev_ca(
    td: &str,
    cert: &Path,
    key: &Path,
    lifetime: Duration,
    key_type: crate::identity::keys::KeyType,
    force: bool,
) -> anyhow::Result<()> {
    let td = parse_trust_domain(td).context("--trust-domain")?;
    let same = std::path::absolute(cert).ok() == std::path::absolute(key).ok();
    if same {
        return Err(anyhow!(
            "--cert and --key name the same file {}: the key would replace the certificate",
            cert.display()
        ));
    }
    // Both directories must be there before either file is written, so a failure never
    // leaves a certificate without its key.
    for (flag, p) in [("--cert", cert), ("--key", key)] {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(anyhow!(
                "{flag}: directory {} does not exist",
                dir.display()
            ));
        }
    }
    if !force {
        if let Some(existing) = [cert, key].into_iter().find(|p| p.exists()) {
            return Err(anyhow!(
                "{} exists: a CA there may be trusted by running sidecars; \
                 pass --force to replace it",
                existing.display()
            ));
        }
    }
    let ca = dev_ca::DevCa::generate_with(&td, lifetime, key_type)?;
    let (cert_pem, key_pem) = ca.to_pem();
    crate::atomic_file::write(cert, cert_pem.as_bytes(), 0o644)
        .with_context(|| format!("--cert: {}", cert.display()))?;
    crate::atomic_file::write(key, key_pem.as_bytes(), 0o600)
        .with_context(|| format!("--key: {}", key.display()))?;
    println!(
        "dev CA ({key_type}) for {td} written to {} and {}",
        cert.display(),
        key.display()
    );
    Ok(())
}

/// `svidcar dev-agent`.
pub fn dev_agent(path: &Path) -> anyhow::Result<()> {
    let config = crate::dev_agent::AgentConfig::load(path)?;
    init_logging(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(crate::dev_agent::run(config, path.to_path_buf()))
}

/// `svidcar workload …`: one Workload API call, printed.
pub fn workload_call(socket: &str, call: WorkloadCall) -> anyhow::Result<()> {
    use crate::identity::workload_api::WorkloadApiClient;
    let path =
        crate::config::parse_workload_socket(socket).map_err(|p| anyhow!("--socket: {p}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        let mut client = WorkloadApiClient::new(&path)?;
        let endpoint = crate::config::Endpoint::Unix(path.clone());
        let status = |e: tonic::Status| call_error(&endpoint, WORKLOAD_API, &e);
        match call {
            WorkloadCall::Jwt {
                audience,
                spiffe_id,
            } => {
                let id = spiffe_id
                    .as_deref()
                    .map(crate::spiffe::parse_spiffe_id)
                    .transpose()
                    .context("--spiffe-id")?;
                for s in client
                    .jwt_svids(audience, id.as_ref())
                    .await
                    .map_err(status)?
                    .svids
                {
                    println!("{} {}", s.spiffe_id, s.svid);
                }
            }
            WorkloadCall::JwtBundles => {
                for (td, jwks) in client.jwt_bundles().await.map_err(status)? {
                    println!("{td} {}", String::from_utf8_lossy(&jwks));
                }
            }
        }
        Ok(())
    })
}

/// `svidcar sds-fetch`.
pub fn sds_fetch(socket: &str, names: Vec<String>) -> anyhow::Result<()> {
    let endpoint =
        crate::config::parse_endpoint(socket, true).map_err(|p| anyhow!("--socket: {p}"))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(sds_fetch::fetch_and_print(&endpoint, names))
}
