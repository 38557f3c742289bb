//! `svidcar sds-fetch`: what an Envoy would get from an SDS socket, printed without keys.

use std::path::Path;

use prost::Message;

use super::client_errors::call_error;
use crate::config::Endpoint;
use crate::proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use crate::proto::envoy::service::discovery::v3::DiscoveryRequest;
use crate::sds::SECRET_TYPE;

/// `svidcar sds-fetch`: one FetchSecrets call, printed without key material; for
/// checking what an Envoy would get from a socket.
pub async fn fetch_and_print(endpoint: &Endpoint, names: Vec<String>) -> anyhow::Result<()> {
    use crate::proto::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    use crate::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let channel = match endpoint {
        Endpoint::Unix(path) => crate::net::unix::channel(path)?,
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::try_from(format!("http://{addr}"))?.connect_lazy()
        }
    };
    let req = DiscoveryRequest {
        resource_names: names,
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    };
    let resp = SecretDiscoveryServiceClient::new(channel)
        .fetch_secrets(req)
        .await
        .map_err(|e| call_error(endpoint, "Envoy's Secret Discovery Service", &e))?
        .into_inner();
    println!("version {}", resp.version_info);
    for any in resp.resources {
        let s = Secret::decode(any.value.as_slice())?;
        match s.r#type {
            Some(Type::TlsCertificate(t)) => {
                let pem = match t.certificate_chain.and_then(|d| d.specifier) {
                    Some(
                        crate::proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(
                            b,
                        ),
                    ) => b,
                    _ => vec![],
                };
                let leaf = crate::identity::pem::certs(Path::new("<sds>"), &pem)
                    .ok()
                    .and_then(|c| c.into_iter().next());
                let info = leaf.and_then(|l| crate::x509::LeafInfo::parse(&l).ok());
                match info {
                    Some(i) => println!(
                        "{} tls_certificate {} serial {}",
                        s.name, i.spiffe_id, i.serial
                    ),
                    None => println!("{} tls_certificate (unreadable chain)", s.name),
                }
            }
            Some(Type::ValidationContext(v)) => {
                let kind = if v.custom_validator_config.is_some() {
                    "spiffe_validator"
                } else {
                    "trusted_ca"
                };
                println!("{} validation_context {kind}", s.name);
            }
            None => println!("{} (empty)", s.name),
        }
    }
    Ok(())
}
