//! Prometheus metrics, one registry for the process. Labels carry listener names and
//! reasons, never certificate or key material.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections: IntCounterVec,
    pub active: IntGaugeVec,
    pub handshake_failures: IntCounterVec,
    pub connection_errors: IntCounterVec,
    pub bytes: IntCounterVec,
    pub transparent: IntCounterVec,
    pub detection: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub opa_errors: IntCounterVec,
    pub identity_version: IntGauge,
    pub svid_expiry: IntGauge,
    pub identity_updates: IntCounter,
    pub identity_updated_at: Gauge,
    pub identity_cached: IntGauge,
    pub sds_streams: IntGauge,
    pub sds_requests: IntCounterVec,
    pub sds_responses: IntCounter,
    pub grpc_closed: IntCounterVec,
    pub jwt_refused: IntCounterVec,
    pub jwt_outbound: IntCounterVec,
    pub jwt_bundle_keys: IntGaugeVec,
    pub connections_revoked: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_key_exchange: IntCounterVec,
    pub config_reloads: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let active = IntGaugeVec::new(
            Opts::new("svidcar_connections_active", "Connections open now"),
            &["listener"],
        )
        .expect("static metric definition");
        r.register(Box::new(active.clone()))
            .expect("metric registered once");
        let identity_version = IntGauge::new(
            "svidcar_identity_version",
            "Version of the identity snapshot in use",
        )
        .expect("static metric definition");
        let svid_expiry = IntGauge::new(
            "svidcar_svid_expiry_timestamp_seconds",
            "notAfter of the default SVID, unix seconds",
        )
        .expect("static metric definition");
        let identity_updates = IntCounter::new(
            "svidcar_identity_updates_total",
            "Identity snapshots published (rotations and bundle changes)",
        )
        .expect("static metric definition");
        let identity_updated_at = Gauge::new(
            "svidcar_identity_updated_timestamp_seconds",
            "When the identity snapshot in use was published (before streams are told), unix seconds",
        )
        .expect("static metric definition");
        r.register(Box::new(identity_updated_at.clone()))
            .expect("metric registered once");
        let identity_cached = IntGauge::new(
            "svidcar_identity_cached",
            "1 while the identity source is unreachable and the last good identity is served",
        )
        .expect("static metric definition");
        let sds_streams = IntGauge::new("svidcar_sds_streams_active", "Open SDS streams")
            .expect("static metric definition");
        let sds_responses = IntCounter::new(
            "svidcar_sds_responses_total",
            "SDS responses sent (answers and pushes)",
        )
        .expect("static metric definition");
        r.register(Box::new(sds_responses.clone()))
            .expect("metric registered once");
        for m in [
            &identity_version,
            &svid_expiry,
            &identity_cached,
            &sds_streams,
        ] {
            r.register(Box::new(m.clone()))
                .expect("metric registered once");
        }
        r.register(Box::new(identity_updates.clone()))
            .expect("metric registered once");
        let jwt_bundle_keys = IntGaugeVec::new(
            Opts::new(
                "svidcar_jwt_bundle_keys",
                "JWT-SVID signing keys in the JWT bundle of each trust domain",
            ),
            &["trust_domain"],
        )
        .expect("static metric definition");
        r.register(Box::new(jwt_bundle_keys.clone()))
            .expect("metric registered once");
        Self {
            connections: counter_vec(
                &r,
                "svidcar_connections_total",
                "Connections accepted",
                &["listener", "direction"],
            ),
            handshake_failures: counter_vec(
                &r,
                "svidcar_handshake_failures_total",
                "TLS handshakes refused or failed, by reason",
                &["listener", "reason"],
            ),
            connection_errors: counter_vec(
                &r,
                "svidcar_connection_errors_total",
                "Connections closed for a reason other than TLS (limit, upstream, idle, loop, no_route, plaintext_refused)",
                &["listener", "reason"],
            ),
            transparent: counter_vec(
                &r,
                "svidcar_transparent_connections_total",
                "Redirected connections carried, by how: mtls, plaintext (permissive inbound), passthrough (outbound, no route)",
                &["listener", "outcome"],
            ),
            http_requests: counter_vec(
                &r,
                "svidcar_http_requests_total",
                "HTTP requests answered, by status code (the upstream's, or svidcar's own)",
                &["listener", "code"],
            ),
            opa_errors: counter_vec(
                &r,
                "svidcar_opa_errors_total",
                "Requests for which the external OPA gave no decision (on_error decided), by reason",
                &["listener", "reason"],
            ),
            detection: counter_vec(
                &r,
                "svidcar_protocol_detection_total",
                "Permissive inbound connections classified: tls, plaintext, timeout (no first bytes in time), server_first (port skips detection)",
                &["listener", "result"],
            ),
            bytes: counter_vec(
                &r,
                "svidcar_bytes_total",
                "Bytes proxied; rx from the downstream, tx to it",
                &["listener", "direction"],
            ),
            active,
            identity_version,
            svid_expiry,
            identity_updates,
            identity_updated_at,
            identity_cached,
            sds_streams,
            sds_requests: counter_vec(
                &r,
                "svidcar_sds_requests_total",
                "SDS requests by kind: ack, nack, denied",
                &["kind"],
            ),
            sds_responses,
            grpc_closed: counter_vec(
                &r,
                "svidcar_grpc_connections_closed_total",
                "Unix-socket gRPC connections closed because a header block could not be repaired, by reason",
                &["reason"],
            ),
            jwt_refused: counter_vec(
                &r,
                "svidcar_jwt_refused_total",
                "Inbound JWT-SVIDs refused (401), by reason: missing, malformed, bad_alg, bad_typ, missing_kid, bad_subject, no_bundle, unknown_key, foreign_trust_domain, bad_signature, missing_exp, expired, not_yet_valid, wrong_audience",
                &["listener", "reason"],
            ),
            jwt_outbound: counter_vec(
                &r,
                "svidcar_jwt_outbound_total",
                "Outbound requests by what happened to the JWT-SVID: injected, app_header_kept (the app's Authorization forwarded), fetch_failed (503)",
                &["listener", "outcome"],
            ),
            jwt_bundle_keys,
            connections_revoked: counter_vec(
                &r,
                "svidcar_connections_revoked_total",
                "Live connections closed because their peer is no longer allowed after a reload or an identity update, by listener and reason (not_allowed, unknown_trust_domain, chain_invalid, expired...)",
                &["listener", "reason"],
            ),
            tls_handshakes: counter_vec(
                &r,
                "svidcar_tls_handshakes_total",
                "Completed mTLS handshakes by listener and kind: full, or resumed (a session ticket; the peer checked again)",
                &["listener", "kind"],
            ),
            tls_key_exchange: counter_vec(
                &r,
                "svidcar_tls_key_exchange_total",
                "Completed mTLS handshakes (inbound and outbound, full and resumed) by the key exchange group negotiated: X25519MLKEM768, X25519, secp256r1, secp384r1",
                &["group"],
            ),
            config_reloads: counter_vec(
                &r,
                "svidcar_config_reloads_total",
                "Config reloads by result: ok, unchanged, invalid (the file does not check), restart_required (a key that cannot change live), failed (a listener could not be built or bound)",
                &["result"],
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
