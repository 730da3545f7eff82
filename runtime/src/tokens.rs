//! Bearer tokens for the TCP listener created at run time (`accelctl tokens create TENANT`),
//! beside the policy's `tokens_sha256`.
//!
//! A token is shown once, when created; only its SHA-256 is kept, in `state_dir/tokens.json`
//! (mode 0600, replaced atomically: written, synced, renamed, directory synced). A token maps
//! to its tenant only while the policy in force has that tenant. A file that cannot be read
//! at start is moved aside with a log line, never a refusal to start: its tokens stop
//! working, which is the safe way to fail.

use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Most tokens kept; creating more is refused.
pub const MAX_TOKENS: usize = 4096;
/// Largest token file read at start.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// One token, as kept and listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub id: String,
    pub tenant: String,
    pub sha256: String,
    pub created_at: u64,
    /// Who created it (`uid N`).
    pub created_by: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// Why a token could not be created or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{MAX_TOKENS} tokens exist already; revoke some first")]
    TooMany,
    #[error("cannot save the tokens: {0}")]
    Io(#[from] io::Error),
}

/// The daemon's tokens.
#[derive(Debug)]
pub struct TokenStore {
    /// `None`: kept in memory only (an embedded daemon without state).
    path: Option<PathBuf>,
    /// Read on every TCP request; written only after the file is saved, so a lookup never
    /// waits for a disk sync.
    entries: RwLock<Vec<TokenEntry>>,
    /// Serializes creating and revoking (held across the save).
    writing: Mutex<()>,
}

fn sha256_hex(token: &str) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(token.as_bytes()))
}

fn random_hex(bytes: usize) -> io::Result<String> {
    use rand::TryRngCore as _;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| io::Error::other(format!("no randomness from the kernel: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl TokenStore {
    pub fn in_memory() -> Self {
        Self {
            path: None,
            entries: RwLock::new(Vec::new()),
            writing: Mutex::new(()),
        }
    }

    /// Loads `path` (absent: no tokens yet).
    pub fn open(path: &Path) -> Self {
        let entries = match read_file(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                let aside = path.with_extension(format!(
                    "json.unreadable-{}",
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                ));
                tracing::error!(path = %path.display(), error = %e, moved_to = %aside.display(), "the token file cannot be read; its tokens no longer authenticate (create new ones with `accelctl tokens create`)");
                if let Err(e) = std::fs::rename(path, &aside) {
                    tracing::error!(error = %e, "cannot move the unreadable token file aside");
                }
                Vec::new()
            }
        };
        Self {
            path: Some(path.to_owned()),
            entries: RwLock::new(entries),
            writing: Mutex::new(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<TokenEntry>> {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Saves `next` and then puts it in force.
    fn replace(&self, next: Vec<TokenEntry>) -> io::Result<()> {
        self.save(&next)?;
        *self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates a token for `tenant`; returns its entry and the token, which is not kept.
    pub fn create(
        &self,
        tenant: &str,
        created_by: &str,
    ) -> Result<(TokenEntry, String), TokenError> {
        let _writing = self.writing();
        let mut next = self.read().clone();
        if next.len() >= MAX_TOKENS {
            return Err(TokenError::TooMany);
        }
        let token = format!("acc_{}", random_hex(32)?);
        let entry = TokenEntry {
            id: format!("tok_{}", random_hex(8)?),
            tenant: tenant.to_owned(),
            sha256: sha256_hex(&token),
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            created_by: created_by.to_owned(),
        };
        next.push(entry.clone());
        self.replace(next)?;
        Ok((entry, token))
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Vec<TokenEntry> {
        self.read().clone()
    }

    /// Revokes the token `id`; `None` if there is none.
    pub fn revoke(&self, id: &str) -> Result<Option<TokenEntry>, TokenError> {
        let _writing = self.writing();
        let mut next = self.read().clone();
        let Some(i) = next.iter().position(|e| e.id == id) else {
            return Ok(None);
        };
        let removed = next.remove(i);
        self.replace(next)?;
        Ok(Some(removed))
    }

    /// The entry of a presented token.
    pub fn lookup(&self, token: &str) -> Option<TokenEntry> {
        let hash = sha256_hex(token);
        self.read().iter().find(|e| e.sha256 == hash).cloned()
    }

    fn save(&self, entries: &[TokenEntry]) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text = serde_json::to_vec_pretty(&TokenFile {
            tokens: entries.to_vec(),
        })
        .map_err(io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> io::Result<Vec<TokenEntry>> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "larger than any file the daemon writes",
        ));
    }
    let file: TokenFile =
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(file.tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_shown_once_kept_as_a_hash_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = TokenStore::open(&path);
        let (entry, token) = store.create("alpha", "uid 0").unwrap();
        assert!(token.starts_with("acc_") && token.len() == 68, "{token}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the token itself is never stored");
        assert!(text.contains(&entry.sha256));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A restarted daemon knows it.
        let again = TokenStore::open(&path);
        assert_eq!(again.lookup(&token).unwrap().tenant, "alpha");
        assert!(again.lookup("acc_wrong").is_none());
        assert_eq!(again.revoke(&entry.id).unwrap(), Some(entry.clone()));
        assert!(again.lookup(&token).is_none());
        assert_eq!(again.revoke(&entry.id).unwrap(), None);
        assert!(TokenStore::open(&path).lookup(&token).is_none());
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_and_its_tokens_stop_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, b"{\"tokens\": [").unwrap();
        let store = TokenStore::open(&path);
        assert!(store.list().is_empty());
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(aside[0].starts_with("tokens.json.unreadable-"), "{aside:?}");
        // And the store works on.
        store.create("beta", "uid 0").unwrap();
        assert_eq!(TokenStore::open(&path).list().len(), 1);
    }
}
