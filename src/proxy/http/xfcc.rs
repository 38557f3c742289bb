//! `x-forwarded-client-cert` as Envoy writes it (filled in by the HTTP mode work).
