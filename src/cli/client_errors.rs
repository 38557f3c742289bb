//! The client side of gRPC for svidcar's commands (`workload`, `sds-fetch`): failed
//! calls said in words that name the socket and what it is not.

use crate::config::Endpoint;

/// A failed gRPC call from a CLI command, said in words: which socket, what it is not.
pub fn call_error(endpoint: &Endpoint, service: &str, e: &tonic::Status) -> anyhow::Error {
    let hint = match e.code() {
        tonic::Code::Unavailable => format!(
            "cannot reach {endpoint}: {} (is the server running, and is this its socket?)",
            tonic_source(e)
        ),
        tonic::Code::Unimplemented => format!(
            "{endpoint} does not serve {service} (gRPC UNIMPLEMENTED): is it the socket of another service?"
        ),
        code => format!("{endpoint}: {code:?}: {}", tonic_source(e)),
    };
    anyhow::anyhow!(hint)
}

/// The message of a status, or the transport error under it when the message is empty.
fn tonic_source(e: &tonic::Status) -> String {
    if !e.message().is_empty() {
        return e.message().to_string();
    }
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = src {
        last = Some(s.to_string());
        src = s.source();
    }
    last.unwrap_or_else(|| "no detail".into())
}
