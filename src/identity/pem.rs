//! Reading certificates and keys from PEM files, with errors that name the file.
//! What a key's PEM block may hold, and how it becomes PKCS#8, is [`super::keys`].

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::keys::PrivateKey;
use super::IdentityError;

fn file_err(path: &Path, problem: impl Into<String>) -> IdentityError {
    IdentityError::File {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// Reads a file whole, naming it in the error.
/// The largest certificate or key file read: bundles of many roots fit easily, and a
/// path pointed at `/dev/zero` or a huge file cannot exhaust memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a regular file whole, at most [`MAX_FILE_BYTES`], naming it in the error. A
/// FIFO, device or directory is refused before it is opened for reading (a FIFO would
/// block `check` forever).
pub fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(file_err(path, "not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(file_err(
            path,
            format!(
                "{} bytes: larger than the {MAX_FILE_BYTES} bytes a PEM file may have",
                meta.len()
            ),
        ));
    }
    let file =
        std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let mut out = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the check and the read: read one byte past the limit.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(file_err(
            path,
            format!("larger than the {MAX_FILE_BYTES} bytes a PEM file may have"),
        ));
    }
    Ok(out)
}

/// Says what is wrong with PEM text in words, never echoing its contents.
fn pem_problem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => {
            format!(
                "a block has no \"-----END {}-----\" line",
                String::from_utf8_lossy(end_marker)
            )
        }
        E::IllegalSectionStart { .. } => "a BEGIN line is malformed".into(),
        E::Base64Decode(_) => "a block is not valid base64".into(),
        other => other.to_string(),
    }
}

/// All certificates in a PEM file; at least one.
pub fn certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not valid PEM: {}", pem_problem(&e))))?;
    if certs.is_empty() {
        return Err(file_err(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// The one private key in a PEM file (PKCS#8, SEC1 or PKCS#1), as PKCS#8. The error
/// names the file and the problem, never key bytes.
pub fn private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKey, IdentityError> {
    PrivateKey::from_pem(bytes).map_err(|e| file_err(path, e.to_string()))
}

/// As [`private_key`], in the form rustls takes.
pub fn key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, IdentityError> {
    private_key(path, bytes).map(|k| k.to_der())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    certs(path, &read(path)?)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    key(path, &read(path)?)
}

pub fn load_private_key(path: &Path) -> Result<PrivateKey, IdentityError> {
    private_key(path, &read(path)?)
}

/// PEM text of certificates, for writing bundles out.
pub fn encode_certs(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| ::pem::encode(&::pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect::<Vec<_>>()
        .join("")
}
