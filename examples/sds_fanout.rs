//! The stream side of `scripts/sds_fanout.py` as a compiled client, for when Python's
//! own per-message cost would be most of what is measured: opens `STREAMS` SDS
//! StreamSecrets streams (state of the world, resource "default") to a unix socket, at
//! most `PER_CONNECTION` on each connection, ACKs every response as Envoy does, and
//! prints one line per response received: `STREAM VERSION UNIX_TIME`, the time taken as
//! soon as tonic hands over the response (errors: `error STREAM TEXT`). Runs until killed.
//!
//! Usage: sds_fanout SOCKET STREAMS PER_CONNECTION

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use svidcar::proto::envoy::config::core::v3::Node;
use svidcar::proto::envoy::service::discovery::v3::DiscoveryRequest;
use svidcar::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn request(version: String, nonce: String) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version,
        resource_names: vec!["default".into()],
        type_url: svidcar::sds::SECRET_TYPE.into(),
        response_nonce: nonce,
        ..Default::default()
    }
}

async fn stream(channel: tonic::transport::Channel, i: usize, out: mpsc::UnboundedSender<String>) {
    let (tx, rx) = mpsc::channel(4);
    let first = DiscoveryRequest {
        node: Some(Node {
            id: format!("fanout-{i}"),
            ..Default::default()
        }),
        ..request(String::new(), String::new())
    };
    let _ = tx.send(first).await;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let mut responses = match client.stream_secrets(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            let _ = out.send(format!("error {i} {}", e.to_string().replace('\n', " ")));
            return;
        }
    };
    loop {
        let why = match responses.message().await {
            Ok(Some(r)) => {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let _ = out.send(format!("{i} {} {:.6}", r.version_info, t.as_secs_f64()));
                if tx.send(request(r.version_info, r.nonce)).await.is_ok() {
                    continue;
                }
                "request channel closed".to_string()
            }
            Ok(None) => "ended by svidcar".to_string(),
            Err(e) => e.to_string().replace('\n', " "),
        };
        let _ = out.send(format!("error {i} {why}"));
        return;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [sock, streams, per_connection] = &args[..] else {
        anyhow::bail!("usage: sds_fanout SOCKET STREAMS PER_CONNECTION");
    };
    let sock = PathBuf::from(sock);
    let streams: usize = streams.parse()?;
    let per_connection: usize = per_connection.parse()?;
    let (out, mut lines) = mpsc::unbounded_channel();
    for first in (0..streams).step_by(per_connection) {
        // One channel is one connection, shared by its streams.
        let channel = svidcar::net::unix::channel(&sock)?;
        for i in first..(first + per_connection).min(streams) {
            tokio::spawn(stream(channel.clone(), i, out.clone()));
        }
    }
    drop(out);
    let mut stdout = std::io::stdout().lock();
    while let Some(line) = lines.recv().await {
        writeln!(stdout, "{line}")?;
        while let Ok(line) = lines.try_recv() {
            writeln!(stdout, "{line}")?;
        }
        stdout.flush()?;
    }
    Ok(())
}
