//! svidcar: a per-pod sidecar that gives a workload a SPIFFE identity on the wire.
//!
//! `run` proxies with mTLS, `check` validates a config, `dev-ca` makes a CA that
//! several `dev` sidecars can share.

mod admin;
mod agent;
mod app;
mod config;
mod grpc_client;
mod h2_authority;
mod identity;
mod log_limit;
mod metrics;
mod proto;
mod proxy;
mod sds;
mod signals;
mod spiffe;
mod tls;
mod unix_socket;
mod x509;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "svidcar", version, about = "SPIFFE mTLS sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum WorkloadCall {
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
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => app::run(&config),
        Command::Check { config } => app::check(&config),
        Command::DevCa {
            key_type,
            trust_domain,
            cert,
            key,
            lifetime,
            force,
        } => app::dev_ca(&trust_domain, &cert, &key, lifetime, key_type, force),
        Command::DevAgent { config } => app::dev_agent(&config),
        Command::Workload { socket, call } => app::workload_call(&socket, call),
        Command::SdsFetch { socket, names } => app::sds_fetch(&socket, names),
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
