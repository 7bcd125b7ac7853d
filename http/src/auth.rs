//! Bearer tokens: random secrets shown once, stored only as SHA-256 hashes.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Manages agents, tokens and reads everything.
    Admin,
    Analyst,
    Responder,
    Compliance,
    Auditor,
    /// An OpenTelemetry collector or platform adapter bound to one realm: sends spans to
    /// `POST /v1/traces`, reads nothing.
    Collector,
}

/// Roles that read events, findings, actions, agents and the control feed (auditors see
/// checkpoints and proofs only). Agent platforms and memory stores reading the control
/// feed hold realm-scoped analyst tokens.
pub const READERS: [Role; 4] = [Role::Admin, Role::Analyst, Role::Responder, Role::Compliance];

/// Checkpoints and proofs reveal hashes, never contents: every role may read them.
pub const EVERYONE: [Role; 5] = [
    Role::Admin,
    Role::Analyst,
    Role::Responder,
    Role::Compliance,
    Role::Auditor,
];

/// Writes a new file only its owner can read (the first admin token).
fn write_owner_only(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
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

/// A stored token: never the secret itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub role: Role,
    /// Realms the token is limited to; empty means all.
    #[serde(default)]
    pub realms: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    /// Lowercase hex SHA-256 of the secret.
    pub sha256: String,
    #[serde(default)]
    pub revoked: bool,
}

/// What `custos token list` shows: everything but the hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub role: Role,
    pub realms: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked: bool,
}

/// The longest token lifetime: ten years.
pub const MAX_TTL_SECS: u64 = 3650 * 86_400;

/// Parses a lifetime such as `30d`, `12h`, `90m` or `3600s` into seconds.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a lifetime: write a number and a unit, such as 30d, 12h, 90m or 3600s")
    })?;
    let scale = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(format!("`{other}` in `{text}` is not a unit: use s, m, h, d or w")),
    };
    match number.checked_mul(scale) {
        Some(0) => Err(format!("`{text}` is no time at all")),
        Some(seconds) if seconds <= MAX_TTL_SECS => Ok(seconds),
        _ => Err(format!(
            "`{text}` is longer than the longest lifetime, {} days; omit `ttl` for a token that does not expire",
            MAX_TTL_SECS / 86_400
        )),
    }
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Analyst => "analyst",
            Role::Responder => "responder",
            Role::Compliance => "compliance",
            Role::Auditor => "auditor",
            Role::Collector => "collector",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "analyst" => Ok(Role::Analyst),
            "responder" => Ok(Role::Responder),
            "compliance" => Ok(Role::Compliance),
            "auditor" => Ok(Role::Auditor),
            "collector" => Ok(Role::Collector),
            other => Err(format!(
                "`{other}` is not a role: use admin, analyst, responder, compliance, auditor or collector"
            )),
        }
    }
}

/// A caller that presented a valid token. `Debug` shows the id, never the secret.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
    pub realms: Vec<String>,
}

/// The token table, persisted in `tokens.json` in the data directory.
///
/// Several processes may share one table: the writer processes of a partition set all
/// serve `DATA/edge/`, and each partition's writer checks collector tokens there. So
/// every change is made under an exclusive lock on `tokens.lock`, to the table as it is
/// on disk then (a token another process made or revoked is kept, never written over),
/// and a table notices another process's change within [`Tokens::RELOAD_EVERY`]
/// ([`Tokens::reload_due`], [`Tokens::reload`]): a token revoked through one process is
/// refused by every other within that time.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    records: Vec<TokenRecord>,
    /// The file as this table last read or wrote it.
    stamp: Option<FileStamp>,
    /// When the file was last looked at, in milliseconds since the Unix epoch.
    looked_ms: std::sync::atomic::AtomicU64,
}

/// Held while one change is made to a token file (`tokens.lock`): see
/// [`Tokens::change_lock`].
pub struct ChangeLock(#[allow(dead_code)] std::fs::File);

/// What tells one version of the token file from the next: each write is a rename of a
/// new file, so its inode changes, and its length and time usually do too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&metadata);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self {
            inode,
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

/// A secret, printed as `**REDACTED**` by both `Debug` and `Display`.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("**REDACTED**")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("**REDACTED**")
    }
}

/// Reads a secret or token file (a webhook's shared secret, a platform's API token),
/// trimmed; refuses an empty one.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = fs_err::read_to_string(path).map_err(|error| error.to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("`{}` is empty", path.display()));
    }
    Ok(Secret(text.to_owned()))
}

pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The file, next to the data, holding the first admin token for CLI use on this host.
pub fn admin_token_path(data: &Path) -> PathBuf {
    data.join("admin.token")
}

impl Tokens {
    /// How often a table looks whether another process changed its file.
    pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    /// Loads `tokens.json`; on first start creates an admin token, writes it owner-only to
    /// `admin.token` for local CLI use, and returns it so it can be printed once. Two
    /// processes starting on one directory at once make one admin token between them.
    pub fn open(data: &Path) -> std::io::Result<(Self, Option<Secret>)> {
        let mut tokens = Self {
            path: data.join("tokens.json"),
            records: Vec::new(),
            stamp: None,
            looked_ms: std::sync::atomic::AtomicU64::new(now_ms()),
        };
        // A table in a directory this process may not write (mounted read-only) is read
        // without the lock; changing it then fails, naming the file.
        let _lock = match tokens.lock() {
            Ok(lock) => Some(lock),
            Err(_) if tokens.path.exists() => None,
            Err(error) => return Err(error),
        };
        if tokens.path.exists() {
            tokens.read_file()?;
            return Ok((tokens, None));
        }
        let secret = tokens.add(Role::Admin, Vec::new(), None)?;
        write_owner_only(&admin_token_path(data), format!("{}\n", secret.0).as_bytes())?;
        Ok((tokens, Some(secret)))
    }

    /// Creates a token and persists its hash. The secret is returned once.
    pub fn create(&mut self, role: Role, realms: Vec<String>, expires_at: Option<String>) -> std::io::Result<Secret> {
        let lock = Self::change_lock(&self.lock_path())?;
        self.create_under(&lock, role, realms, expires_at)
    }

    /// [`Tokens::create`] under a lock taken before (so that a caller sharing the table
    /// waits for other processes without holding it).
    pub fn create_under(
        &mut self,
        _lock: &ChangeLock,
        role: Role,
        realms: Vec<String>,
        expires_at: Option<String>,
    ) -> std::io::Result<Secret> {
        self.read_file()?;
        self.add(role, realms, expires_at)
    }

    /// Adds a token to the table as read, and writes it; the caller holds the lock.
    fn add(&mut self, role: Role, realms: Vec<String>, expires_at: Option<String>) -> std::io::Result<Secret> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|error| std::io::Error::other(error.to_string()))?;
        let secret = format!("cus_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        let sha256 = hash_token(&secret);
        self.records.push(TokenRecord {
            id: sha256[..12].to_owned(),
            role,
            realms,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            expires_at,
            sha256,
            revoked: false,
        });
        self.save()?;
        Ok(Secret(secret))
    }

    /// How long a change waits for another process's change to the file: the lock is
    /// held for one small read and write, so a longer wait is a stuck holder (a hung
    /// shared file system), and the change fails rather than hold the caller's table.
    pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    /// Where the lock every change to this table's file is made under lives.
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    fn lock(&self) -> std::io::Result<ChangeLock> {
        Self::change_lock(&self.lock_path())
    }

    /// The exclusive lock every change to the file is made under (`tokens.lock`, released
    /// when it is dropped, or by the kernel when the process dies), waiting at most
    /// [`Tokens::LOCK_WAIT`] for another process; it blocks the calling thread meanwhile.
    pub fn change_lock(path: &Path) -> std::io::Result<ChangeLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|error| std::io::Error::new(error.kind(), format!("`{}`: {error}", path.display())))?;
        let deadline = std::time::Instant::now() + Self::LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(ChangeLock(file)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "`{}` has been held by another process for {} s; the token table was not changed",
                            path.display(),
                            Self::LOCK_WAIT.as_secs()
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(error),
            }
        }
    }

    /// Reads the file into the table. A missing file leaves the table as it is (empty at
    /// the first start; after that a file deleted under a running node, which its next
    /// change writes again, rather than locking every caller out).
    fn read_file(&mut self) -> std::io::Result<()> {
        let stamp = FileStamp::of(&self.path);
        match fs_err::read_to_string(&self.path) {
            Ok(text) => {
                self.records = serde_json::from_str(&text).map_err(|error| {
                    std::io::Error::other(format!("`{}` is not a token table: {error}", self.path.display()))
                })?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        self.stamp = stamp;
        Ok(())
    }

    /// Whether the file may have changed since this table read it: true at most once per
    /// [`Tokens::RELOAD_EVERY`], and only when the file's inode, length or time moved.
    pub fn reload_due(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = now_ms();
        let looked = self.looked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(looked) < Self::RELOAD_EVERY.as_millis() as u64
            || self
                .looked_ms
                .compare_exchange(looked, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        FileStamp::of(&self.path) != self.stamp
    }

    /// Whether the file is not the one this table last read or wrote.
    pub fn changed(&self) -> bool {
        FileStamp::of(&self.path) != self.stamp
    }

    /// Reads the file again, as another process may have changed it. A file that cannot
    /// be read leaves the table as it was, and says why.
    pub fn reload(&mut self) -> std::io::Result<()> {
        self.read_file()
    }

    /// Every token, without its hash.
    pub fn list(&self) -> Vec<TokenView> {
        self.records
            .iter()
            .map(|record| TokenView {
                id: record.id.clone(),
                role: record.role,
                realms: record.realms.clone(),
                created_at: record.created_at.clone(),
                expires_at: record.expires_at.clone(),
                revoked: record.revoked,
            })
            .collect()
    }

    /// Revokes token `id`; `Ok(false)` when there is no such token.
    pub fn revoke(&mut self, id: &str) -> std::io::Result<bool> {
        let lock = self.lock()?;
        self.revoke_under(&lock, id)
    }

    /// [`Tokens::revoke`] under a lock taken before.
    pub fn revoke_under(&mut self, _lock: &ChangeLock, id: &str) -> std::io::Result<bool> {
        self.read_file()?;
        let Some(record) = self.records.iter_mut().find(|record| record.id == id) else {
            return Ok(false);
        };
        record.revoked = true;
        self.save()?;
        Ok(true)
    }

    /// Writes the table; the caller holds the lock and read the file under it.
    fn save(&mut self) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&self.records).map_err(std::io::Error::other)?;
        let temporary = self.path.with_extension("json.tmp");
        fs_err::write(&temporary, text)?;
        fs_err::File::open(&temporary)?.sync_all()?;
        fs_err::rename(&temporary, &self.path)?;
        self.stamp = FileStamp::of(&self.path);
        Ok(())
    }

    /// Whether token `id` exists, is not revoked and has not expired.
    pub fn valid(&self, id: &str) -> bool {
        self.records
            .iter()
            .find(|record| record.id == id)
            .is_some_and(|record| !record.revoked && !expired(record))
    }

    /// The caller a bearer secret belongs to, if it is valid, unexpired and unrevoked.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        self.authenticate_sha256(&hash_token(secret))
    }

    /// [`Tokens::authenticate`] by the secret's hash (lowercase hex SHA-256): how the
    /// writer's node authenticates an adapter request an ingest node passed on, which
    /// carries the hash, never the token.
    pub fn authenticate_sha256(&self, digest: &str) -> Option<Caller> {
        let record = self
            .records
            .iter()
            .find(|record| subtle_eq(record.sha256.as_bytes(), digest.as_bytes()))?;
        if record.revoked || expired(record) {
            return None;
        }
        Some(Caller {
            token_id: record.id.clone(),
            role: record.role,
            realms: record.realms.clone(),
        })
    }
}

/// Milliseconds on a monotonic clock, so a wall clock set back never stops a table from
/// looking at its file again: an hour plus the time since the first call in this
/// process (the hour puts every moment far from zero, which a reset `looked_ms` means).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    3_600_000 + START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// Past its expiry (an unreadable expiry counts as past).
fn expired(record: &TokenRecord) -> bool {
    record.expires_at.as_ref().is_some_and(|expiry| {
        chrono::DateTime::parse_from_rfc3339(expiry).map_or(true, |expiry| expiry < chrono::Utc::now())
    })
}

fn subtle_eq(left: &[u8], right: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    left.ct_eq(right).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks paths immutable (`chattr +i`), which even root cannot write, as on a
    /// read-only mount; undone when dropped, so the temporary directory can go.
    struct Immutable(Vec<PathBuf>);

    impl Immutable {
        fn set(paths: &[PathBuf]) -> Self {
            let guard = Self(paths.to_vec());
            let status = std::process::Command::new("chattr").arg("+i").args(paths).status();
            assert!(
                status.as_ref().is_ok_and(std::process::ExitStatus::success),
                "chattr +i {paths:?}: {status:?} (the test needs chattr and a file system with the immutable attribute)"
            );
            guard
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr").arg("-i").args(&self.0).status();
        }
    }

    /// A token table in a directory this process may not write (a read-only mount: here
    /// the immutable attribute, which binds root too) is read without its lock and
    /// authenticates; a change fails, naming the lock file, and leaves the table as it was.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_read_only_table_is_read_and_refuses_changes_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (_, admin) = Tokens::open(dir.path()).unwrap();
        let admin = admin.unwrap();
        let paths: Vec<PathBuf> = ["tokens.json", "tokens.lock", "admin.token", ""]
            .iter()
            .map(|name| dir.path().join(name))
            .collect();
        let _frozen = Immutable::set(&paths);
        assert!(
            std::fs::OpenOptions::new().write(true).open(&paths[1]).is_err(),
            "the lock file is not writable"
        );
        let (mut tokens, made) = Tokens::open(dir.path()).unwrap();
        assert!(made.is_none());
        assert_eq!(
            tokens.authenticate(&admin.0).map(|caller| caller.role),
            Some(Role::Admin)
        );
        let error = tokens.create(Role::Analyst, Vec::new(), None).unwrap_err();
        assert!(error.to_string().contains("tokens.lock"), "{error}");
        assert_eq!(tokens.records.len(), 1, "nothing added");
    }

    /// Two processes serving one token directory (the writer processes of a partition
    /// set share `DATA/edge/`): neither writes over the other's tokens, and a token made
    /// or revoked through one is seen by the other once it looks again.
    #[test]
    fn two_tables_on_one_file_keep_each_others_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, admin) = Tokens::open(dir.path()).unwrap();
        let (mut second, again) = Tokens::open(dir.path()).unwrap();
        assert!(admin.is_some() && again.is_none(), "one admin token between them");
        let a = first.create(Role::Collector, vec!["eng".into()], None).unwrap();
        let b = second.create(Role::Analyst, Vec::new(), None).unwrap();
        // The second made its token on the table as the file held it: both are kept.
        assert!(second.authenticate(&a.0).is_some());
        let (third, _) = Tokens::open(dir.path()).unwrap();
        assert!(third.authenticate(&a.0).is_some() && third.authenticate(&b.0).is_some());
        assert_eq!(third.list().len(), 3);
        // The first has not looked again yet; after the reload interval it sees the change.
        assert!(first.authenticate(&b.0).is_none());
        first.looked_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(first.reload_due());
        first.reload().unwrap();
        assert!(first.authenticate(&b.0).is_some());
        assert!(!first.reload_due(), "looked just now");
        // A revocation through the second reaches the first.
        let id = hash_token(&a.0)[..12].to_owned();
        assert!(second.revoke(&id).unwrap());
        first.looked_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(first.reload_due());
        first.reload().unwrap();
        assert!(first.authenticate(&a.0).is_none(), "revoked elsewhere");
        // Nothing changed since: not due even after the interval.
        first.looked_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(!first.reload_due());
        // A file deleted under running tables: they keep what they read, and the next
        // change writes it again.
        fs_err::remove_file(dir.path().join("tokens.json")).unwrap();
        first.looked_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(first.reload_due());
        first.reload().unwrap();
        assert!(first.authenticate(&b.0).is_some(), "kept");
        let c = second.create(Role::Auditor, Vec::new(), None).unwrap();
        let (reopened, admin) = Tokens::open(dir.path()).unwrap();
        assert!(admin.is_none());
        assert!(reopened.authenticate(&b.0).is_some() && reopened.authenticate(&c.0).is_some());
        // A change waits for a process holding the lock, then gives up naming the file.
        let held = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.path().join("tokens.lock"))
            .unwrap();
        held.lock().unwrap();
        let error = second.create(Role::Auditor, Vec::new(), None).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("tokens.lock"), "{error}");
        drop(held);
        second.create(Role::Auditor, Vec::new(), None).unwrap();
        // An empty file is not an empty table (it never is one this code wrote).
        let empty = tempfile::tempdir().unwrap();
        fs_err::write(empty.path().join("tokens.json"), "").unwrap();
        assert!(
            Tokens::open(empty.path())
                .unwrap_err()
                .to_string()
                .contains("not a token table")
        );
        // A table the other process cannot read leaves the one read before.
        fs_err::write(dir.path().join("tokens.json"), "not json").unwrap();
        first.looked_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(first.reload_due());
        assert!(first.reload().unwrap_err().to_string().contains("not a token table"));
        assert!(first.authenticate(&b.0).is_some());
    }

    #[test]
    fn lifetimes_parse_and_bad_ones_name_the_value() {
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400));
        assert_eq!(parse_ttl("12h"), Ok(43_200));
        assert_eq!(parse_ttl("90m"), Ok(5_400));
        assert_eq!(parse_ttl("3600"), Ok(3_600));
        assert!(parse_ttl("0d").unwrap_err().contains("`0d`"));
        assert!(parse_ttl("3y").unwrap_err().contains("`y`"));
        assert!(parse_ttl("soon").unwrap_err().contains("`soon`"));
        assert_eq!(parse_ttl("3650d"), Ok(MAX_TTL_SECS));
        assert!(parse_ttl("3651d").unwrap_err().contains("longest lifetime"));
        assert!(parse_ttl("99999999999999d").unwrap_err().contains("`99999999999999d`"));
        assert!(
            parse_ttl("99999999999999999999999d")
                .unwrap_err()
                .contains("not a lifetime")
        );
    }
}
