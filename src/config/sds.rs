//! `sds`: the typed SDS settings.

use super::raw::SdsConfig;
use super::values::{parse_endpoint, Endpoint};
use super::{ConfigError, MAX_CONNECTIONS};

/// SDS as it will be served.
#[derive(Debug, Clone, PartialEq)]
pub struct SdsSpec {
    pub listen: Vec<Endpoint>,
    /// Mode of each unix socket.
    pub socket_mode: u32,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub default_svid_name: String,
    pub default_bundle_name: String,
    pub all_bundles_name: String,
    pub disable_spiffe_cert_validation: bool,
    pub tcp_allow_keys: bool,
    pub max_streams: usize,
    pub streams_per_connection: u32,
}

impl SdsConfig {
    /// The per-connection stream cap in effect.
    fn streams_per_connection(&self) -> u32 {
        self.max_streams_per_connection
            .unwrap_or_else(|| u32::try_from(self.max_streams).unwrap_or(u32::MAX).min(128))
    }

    /// Checks the section once and returns it typed.
    pub fn spec(&self) -> Result<SdsSpec, ConfigError> {
        let mut out = Vec::new();
        let list = self.listen.to_vec();
        if list.is_empty() {
            return Err(ConfigError::new("sds.listen", "no address"));
        }
        for (i, a) in list.iter().enumerate() {
            let at = format!("sds.listen[{i}]");
            let l = parse_endpoint(a, true).map_err(|p| ConfigError::new(at, p))?;
            out.push(l);
        }
        let mode = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::new(
                    "sds.socket_mode",
                    format!("{:?} is not an octal mode like \"0660\"", self.socket_mode),
                )
            })?;
        let names = [
            ("sds.default_svid_name", &self.default_svid_name),
            ("sds.default_bundle_name", &self.default_bundle_name),
            (
                "sds.default_all_bundles_name",
                &self.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(ConfigError::new(*key, "must not be empty"));
            }
            if names[..i].iter().any(|(_, other)| other == name) {
                return Err(ConfigError::new(
                    *key,
                    format!("{name:?} is used by another default name"),
                ));
            }
        }
        if self.max_streams == 0 || self.max_streams > MAX_CONNECTIONS {
            return Err(ConfigError::new(
                "sds.max_streams",
                format!("must be from 1 to {MAX_CONNECTIONS}"),
            ));
        }
        let per_conn = self.streams_per_connection();
        if per_conn == 0 || per_conn as usize > self.max_streams {
            return Err(ConfigError::new(
                "sds.max_streams_per_connection",
                format!("must be from 1 to sds.max_streams ({})", self.max_streams),
            ));
        }
        if self.spiffe_cert_validation.is_some() {
            return Err(ConfigError::new(
                "sds.spiffe_cert_validation",
                "was replaced by SPIRE's `disable_spiffe_cert_validation`: the SPIFFE validator now goes to every Envoy 1.18 or newer; write `disable_spiffe_cert_validation: true` to serve trusted_ca to all, or remove the key",
            ));
        }
        if self.tcp_allow_keys {
            for (i, l) in out.iter().enumerate() {
                if let Endpoint::Tcp(addr) = l {
                    if !addr.ip().is_loopback() {
                        return Err(ConfigError::new(
                            "sds.tcp_allow_keys",
                            format!(
                                "private keys may go over TCP only on a loopback address, but sds.listen[{i}] is tcp://{addr}: listen on 127.0.0.1 or [::1], or serve keys over the unix socket"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(SdsSpec {
            listen: out,
            socket_mode: mode,
            allowed_uids: self.allowed_uids.clone(),
            allowed_gids: self.allowed_gids.clone(),
            default_svid_name: self.default_svid_name.clone(),
            default_bundle_name: self.default_bundle_name.clone(),
            all_bundles_name: self.default_all_bundles_name.clone(),
            disable_spiffe_cert_validation: self.disable_spiffe_cert_validation,
            tcp_allow_keys: self.tcp_allow_keys,
            max_streams: self.max_streams,
            streams_per_connection: per_conn,
        })
    }
}
