//! `svidcar inject`: Kubernetes YAML in (a file, a directory of `.yaml`/`.yml` files, or
//! stdin), the same YAML out on stdout with the sidecar added to every pod template.
//! Skipped objects and errors are reported on stderr; an object that cannot be injected
//! is written unchanged and the exit code says so.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::Args;

use crate::inject::{inject_yaml, IdentityVolume, Options, Outcome};

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// A YAML file, a directory of them, or `-` for stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
    /// The svidcar image of both containers (the `svidcar.io/image` annotation wins).
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    image_pull_policy: Option<String>,
    /// Mount the Workload API socket directory from this host path instead of the
    /// SPIFFE CSI driver.
    #[arg(long, value_name = "DIR")]
    socket_host_path: Option<String>,
    /// The CSI driver that mounts the Workload API socket.
    #[arg(long, default_value = "csi.spiffe.io")]
    csi_driver: String,
    /// The socket's file name in that directory.
    #[arg(long)]
    socket_name: Option<String>,
    /// `strict` (mTLS only) or `permissive`, unless `svidcar.io/mode` says otherwise.
    #[arg(long)]
    mode: Option<String>,
    /// Destinations reached over mTLS, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    mesh_cidrs: Vec<String>,
    #[arg(long)]
    proxy_uid: Option<u32>,
    #[arg(long)]
    admin_port: Option<u16>,
    #[arg(long)]
    inbound_port: Option<u16>,
    #[arg(long)]
    outbound_port: Option<u16>,
    #[arg(long)]
    drain_seconds: Option<u32>,
}

impl InjectArgs {
    pub fn options(&self) -> Options {
        let mut o = Options::default();
        if let Some(v) = &self.image {
            o.image = v.clone();
        }
        o.image_pull_policy = self.image_pull_policy.clone();
        o.identity_volume = match &self.socket_host_path {
            Some(path) => IdentityVolume::HostPath { path: path.clone() },
            None => IdentityVolume::Csi {
                driver: self.csi_driver.clone(),
            },
        };
        if let Some(v) = &self.socket_name {
            o.socket_name = v.clone();
        }
        if let Some(v) = &self.mode {
            o.mode = v.clone();
        }
        if !self.mesh_cidrs.is_empty() {
            o.mesh_cidrs = self.mesh_cidrs.clone();
        }
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { o.$f = v; })* };
        }
        set!(
            proxy_uid,
            admin_port,
            inbound_port,
            outbound_port,
            drain_seconds
        );
        o
    }
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let opts = args.options();
    let text = read_input(&args.input)?;
    let (out, reports) = inject_yaml(&text, &opts).map_err(|e| anyhow!("{e}"))?;
    let mut failed = 0;
    for r in &reports {
        match &r.outcome {
            Ok(Outcome::Skipped(why)) => eprintln!("svidcar inject: skipped {}: {why}", r.object),
            Ok(Outcome::AlreadyInjected) => {
                eprintln!("svidcar inject: {} already injected", r.object)
            }
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                eprintln!("svidcar inject: {} left unchanged: {e}", r.object);
            }
        }
    }
    print!("{out}");
    if failed > 0 {
        return Err(anyhow!("{failed} object(s) could not be injected"));
    }
    Ok(())
}

fn read_input(input: &Path) -> anyhow::Result<String> {
    if input == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        return Ok(s);
    }
    if input.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| format!("{}: cannot list", input.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let mut all = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("{}: cannot read", f.display()))?;
            all.push_str("\n---\n");
            all.push_str(&text);
        }
        return Ok(all);
    }
    std::fs::read_to_string(input).with_context(|| format!("{}: cannot read", input.display()))
}
