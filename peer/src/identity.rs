//! The appliance's identity: an ed25519 key generated on first start and kept private (0600).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sitecast_manifest::SecretKey;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity key {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("identity key {path} is unreadable: {error}")]
    Corrupt { path: String, error: String },
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// Loads the key at `path`, creating it on first start.
pub fn load_or_create(path: &Path) -> Result<SecretKey, IdentityError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => SecretKey::from_file_text(&text)
            .map_err(|e| IdentityError::Corrupt { path: shown, error: e.to_string() }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate().map_err(|e| IdentityError::Random(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|error| IdentityError::Io { path: shown.clone(), error })?;
            }
            let write = || -> std::io::Result<()> {
                let mut file =
                    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                file.write_all(key.to_file_text().as_bytes())?;
                file.sync_all()
            };
            write().map_err(|error| IdentityError::Io { path: shown, error })?;
            Ok(key)
        }
        Err(error) => Err(IdentityError::Io { path: shown, error }),
    }
}

/// MAC addresses of this machine's network interfaces (except loopback), normalized.
pub fn local_macs() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut macs: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
        .filter_map(|a| sitecast_manifest::api::normalize_mac(a.trim()))
        .filter(|m| m != "00:00:00:00:00:00")
        .collect();
    macs.sort();
    macs.dedup();
    macs
}
