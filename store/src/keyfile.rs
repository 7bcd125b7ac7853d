//! Key files: JSON holding an ed25519 seed, written owner-only (mode 0600).
//!
//! ```json
//! {"type":"custos-ed25519-key","did":"did:key:z6Mk…","seed":"<base64 of 32 bytes>"}
//! ```

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use custos_event::AgentKey;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    r#type: String,
    did: String,
    seed: String,
}

const KEY_TYPE: &str = "custos-ed25519-key";

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("key file `{path}` is not a Custos key: {detail}")]
    Format { path: String, detail: String },
    #[error("key file `{0}` already exists; refusing to overwrite a key")]
    Exists(String),
    #[error("key file `{path}` is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
}

/// Writes `contents` to a new file with mode 0600, failing if it exists.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = fs_err::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use fs_err::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Writes `key` to a new owner-only file.
pub fn write_key(path: &Path, key: &AgentKey) -> Result<(), KeyFileError> {
    if path.exists() {
        return Err(KeyFileError::Exists(path.display().to_string()));
    }
    let file = KeyFile {
        r#type: KEY_TYPE.into(),
        did: key.did().to_owned(),
        seed: base64::engine::general_purpose::STANDARD.encode(key.seed()),
    };
    let mut text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
    text.push('\n');
    write_private(path, text.as_bytes())?;
    Ok(())
}

/// Reads a key file, refusing one that others can read.
pub fn read_key(path: &Path) -> Result<AgentKey, KeyFileError> {
    let shown = || path.display().to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs_err::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions { path: shown(), mode });
        }
    }
    let text = fs_err::read_to_string(path)?;
    let file: KeyFile = serde_json::from_str(&text).map_err(|error| KeyFileError::Format {
        path: shown(),
        detail: error.to_string(),
    })?;
    if file.r#type != KEY_TYPE {
        return Err(KeyFileError::Format {
            path: shown(),
            detail: format!("`type` is `{}`, expected `{KEY_TYPE}`", file.r#type),
        });
    }
    let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(&file.seed)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| KeyFileError::Format {
            path: shown(),
            detail: "`seed` is not base64 of 32 bytes".into(),
        })?;
    let key = AgentKey::from_seed(&seed);
    if key.did() != file.did {
        return Err(KeyFileError::Format {
            path: shown(),
            detail: format!("`did` `{}` does not match the seed's key `{}`", file.did, key.did()),
        });
    }
    Ok(key)
}

/// Reads the key at `path`, creating it first if it does not exist.
pub fn load_or_create(path: &Path) -> Result<AgentKey, KeyFileError> {
    if path.exists() {
        return read_key(path);
    }
    let key = AgentKey::generate().map_err(std::io::Error::other)?;
    write_key(path, &key)?;
    Ok(key)
}
