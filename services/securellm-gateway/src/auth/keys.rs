//! API keys: `sk-slm-` + 64 hex characters (256 random bits), shown once at creation and stored
//! only as a SHA-256 hash. Lookup hashes the presented secret and compares hashes in constant
//! time. Each key carries a subject, model patterns (`*` wildcards) and limits.
//!
//! The key table lives in SQLite (`keys.db` in the data directory) or, shared by every gateway
//! using it, in PostgreSQL (`[storage] url`); an in-memory copy answers the hot path without
//! touching the database. With PostgreSQL every change is announced on the `securellm_keys`
//! channel (`NOTIFY`) in its own transaction; each gateway listens and reloads its copy, so a
//! revocation made through any gateway is enforced by all within about a round trip. After the
//! database was away (the listener reconnects) and every 30 s the copy is reloaded in full; while
//! the database is unreachable the last copy keeps answering.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use subtle::ConstantTimeEq;

use securellm_common::time::now_ms;

/// Key store errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no API key with id {0:?}")]
    NotFound(String),
    #[error("API key {0:?} is revoked")]
    Revoked(String),
    #[error("cannot read random bytes: {0}")]
    Random(String),
}

/// A key's record (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// First characters of the secret, for recognising it in listings.
    pub prefix: String,
    pub subject: String,
    pub models: Vec<String>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrent: Option<u32>,
    /// Largest `max_tokens` a request may ask for (the gateway's `max_tokens_cap` bounds it too).
    pub max_tokens: Option<u32>,
    /// The priority of the loads this caller's requests trigger (GPU memory leases), and of a
    /// loaded model it uses; `None`: the model's configured priority. A lower-priority caller
    /// never evicts a higher-priority caller's model.
    pub priority: Option<i32>,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked_ms: Option<u64>,
    /// May call the GatewayAdmin service (JWTs whose `scope` includes `admin`; API keys never).
    pub admin: bool,
}

impl KeyRecord {
    /// May this key use `model`?
    pub fn allows(&self, model: &str) -> bool {
        self.models.iter().any(|p| glob(p, model))
    }

    pub fn active(&self, now: u64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|e| e > now)
    }
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// What a new key may do.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub name: String,
    pub subject: Option<String>,
    pub models: Vec<String>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrent: Option<u32>,
    /// Largest `max_tokens` a request may ask for; `None` or 0 = the gateway's cap only.
    pub max_tokens: Option<u32>,
    /// See [`KeyRecord::priority`].
    pub priority: Option<i32>,
    pub expires_ms: Option<u64>,
}

/// What [`KeyStore::update`] changes; `None` = unchanged.
#[derive(Clone, Debug, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub models: Option<Vec<String>>,
    /// (requests/min, tokens/min, concurrent); `None` or 0 inside = no limit.
    #[allow(clippy::type_complexity)]
    pub limits: Option<(Option<u32>, Option<u32>, Option<u32>)>,
    /// New per-key `max_tokens` cap; 0 = none (the gateway's cap only).
    pub max_tokens: Option<u32>,
    /// New priority; `Some(None)` = back to the model's.
    pub priority: Option<Option<i32>>,
    /// New expiry in unix ms; 0 = never.
    pub expires_ms: Option<u64>,
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if name.trim().is_empty() || name.len() > 128 {
        return Err(KeyError::Invalid {
            field: "name",
            message: "must be 1..=128 bytes".into(),
        });
    }
    Ok(())
}

fn check_models(models: &[String]) -> Result<(), KeyError> {
    if models.is_empty() || models.iter().any(|m| m.is_empty() || m.len() > 256) {
        return Err(KeyError::Invalid {
            field: "models",
            message:
                "at least one non-empty model pattern (at most 256 bytes) is needed (`*` for all)"
                    .into(),
        });
    }
    Ok(())
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Where the key table lives.
#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One statement on whichever database: the SQLite text (`?` placeholders) or the PostgreSQL
/// one (`$n`), with the same binds; the rows it changed.
macro_rules! execute {
    ($db:expr, $sqlite:literal, $pg:literal $(, $b:expr)* $(,)?) => {
        match $db {
            Db::Sqlite(p) => sqlx::query($sqlite)$(.bind($b))*.execute(p).await.map(|r| r.rows_affected()),
            Db::Postgres(p) => sqlx::query($pg)$(.bind($b))*.execute(p).await.map(|r| r.rows_affected()),
        }
    };
}

/// The channel every gateway on one PostgreSQL database listens on for key changes.
pub const KEYS_CHANNEL: &str = "securellm_keys";

/// A row of `api_keys`, as both databases return it.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    hash: Vec<u8>,
    name: String,
    prefix: String,
    subject: String,
    models: String,
    rpm: Option<i64>,
    tpm: Option<i64>,
    concurrent: Option<i64>,
    created_ms: i64,
    expires_ms: Option<i64>,
    revoked_ms: Option<i64>,
    max_tokens: Option<i64>,
    priority: Option<i64>,
}

const SELECT_KEYS: &str = "SELECT id, hash, name, prefix, subject, models, rpm, tpm, concurrent, \
     created_ms, expires_ms, revoked_ms, max_tokens, priority FROM api_keys";

/// The PostgreSQL schema (`migrations-postgres/`: keys and the shared limiter's tables), applied
/// by sqlx's migrator, which holds an advisory lock while it runs so gateways starting together
/// do not race.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-postgres");

/// The key store.
#[derive(Clone)]
pub struct KeyStore {
    db: Db,
    by_hash: Arc<RwLock<HashMap<[u8; 32], KeyRecord>>>,
}

impl KeyStore {
    pub async fn open(path: &Path) -> Result<Self, KeyError> {
        // Key hashes are for the service only: the file (and its -wal / -shm) is mode 0600.
        crate::private_file(path).map_err(|e| {
            sqlx::Error::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let connect = || {
            SqlitePoolOptions::new()
                .max_connections(2)
                .connect_with(opts.clone())
        };
        let mut pool = connect().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS api_keys (
                id TEXT PRIMARY KEY NOT NULL, hash BLOB NOT NULL UNIQUE, name TEXT NOT NULL,
                prefix TEXT NOT NULL, subject TEXT NOT NULL, models TEXT NOT NULL,
                rpm INTEGER, tpm INTEGER, concurrent INTEGER,
                created_ms INTEGER NOT NULL, expires_ms INTEGER, revoked_ms INTEGER,
                max_tokens INTEGER, priority INTEGER)",
        )
        .execute(&pool)
        .await?;
        // Added later: older databases get the columns.
        let have: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('api_keys')")
            .fetch_all(&pool)
            .await?
            .iter()
            .filter_map(|r| r.try_get::<String, _>("name").ok())
            .collect();
        let missing: Vec<&str> = ["max_tokens", "priority"]
            .into_iter()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if !missing.is_empty() {
            for c in missing {
                // `c` is one of the fixed column names above.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE api_keys ADD COLUMN {c} INTEGER"
                )))
                .execute(&pool)
                .await?;
            }
            // Connections opened before the change may hold the old table shape.
            pool.close().await;
            pool = connect().await?;
        }
        let s = Self {
            db: Db::Sqlite(pool),
            by_hash: Arc::new(RwLock::new(HashMap::new())),
        };
        s.reload().await?;
        Ok(s)
    }

    /// The key table in PostgreSQL at `url`, shared with every gateway using the same database
    /// (created if missing). Spawns the listener that keeps the in-memory copy current.
    pub async fn open_postgres(url: &str) -> Result<Self, KeyError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        PG_MIGRATOR.run(&pool).await.map_err(sqlx::Error::from)?;
        let s = Self {
            db: Db::Postgres(pool.clone()),
            by_hash: Arc::new(RwLock::new(HashMap::new())),
        };
        s.reload().await?;
        tokio::spawn(s.clone().follow(pool));
        Ok(s)
    }

    /// Reload on every `NOTIFY` of [`KEYS_CHANNEL`], in full after a lost connection and every
    /// 30 s; errors (the database away) keep the last copy and are retried.
    async fn follow(self, pool: PgPool) {
        let mut warned = false;
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(
                            "key changes: cannot listen on PostgreSQL ({e}); serving the keys already loaded, retrying"
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(KEYS_CHANNEL).await {
                tracing::warn!("key changes: LISTEN failed: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            // Anything missed while not listening.
            if self.reload().await.is_ok() && std::mem::take(&mut warned) {
                tracing::info!("key changes: listening on PostgreSQL again; keys reloaded");
            }
            loop {
                let next =
                    tokio::time::timeout(std::time::Duration::from_secs(30), listener.try_recv())
                        .await;
                match next {
                    // A change, or the periodic resync.
                    Ok(Ok(Some(_))) | Err(_) => {
                        let _ = self.reload().await;
                    }
                    // The connection was lost and re-established: notifications may be lost.
                    Ok(Ok(None)) => {
                        let _ = self.reload().await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("key changes: the listener failed ({e}); reconnecting");
                        warned = true;
                        break;
                    }
                }
            }
        }
    }

    /// Tell every gateway on the shared database (this one included) to reload.
    async fn announce(&self, id: &str) -> Result<(), KeyError> {
        if let Db::Postgres(p) = &self.db {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(KEYS_CHANNEL)
                .bind(id)
                .execute(p)
                .await?;
        }
        Ok(())
    }

    async fn reload(&self) -> Result<(), KeyError> {
        let rows: Vec<KeyRow> = match &self.db {
            Db::Sqlite(p) => sqlx::query_as(SELECT_KEYS).fetch_all(p).await?,
            Db::Postgres(p) => sqlx::query_as(SELECT_KEYS).fetch_all(p).await?,
        };
        let mut map = HashMap::new();
        for r in rows {
            let Ok(h): Result<[u8; 32], _> = r.hash.try_into() else {
                continue;
            };
            let opt = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
            map.insert(
                h,
                KeyRecord {
                    id: r.id,
                    name: r.name,
                    prefix: r.prefix,
                    subject: r.subject,
                    models: serde_json::from_str(&r.models).unwrap_or_default(),
                    rpm: opt(r.rpm),
                    tpm: opt(r.tpm),
                    concurrent: opt(r.concurrent),
                    max_tokens: opt(r.max_tokens),
                    priority: r.priority.and_then(|v| i32::try_from(v).ok()),
                    created_ms: r.created_ms as u64,
                    expires_ms: r.expires_ms.map(|v| v as u64),
                    revoked_ms: r.revoked_ms.map(|v| v as u64),
                    admin: false,
                },
            );
        }
        if let Ok(mut m) = self.by_hash.write() {
            *m = map;
        }
        Ok(())
    }

    /// Create a key; returns the secret (shown once) and its record.
    pub async fn create(&self, k: NewKey) -> Result<(String, KeyRecord), KeyError> {
        check_name(&k.name)?;
        check_models(&k.models)?;
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| KeyError::Random(e.to_string()))?;
        let secret = format!("sk-slm-{}", hex::encode(raw));
        let mut idb = [0u8; 6];
        getrandom::fill(&mut idb).map_err(|e| KeyError::Random(e.to_string()))?;
        let id = format!("key_{}", hex::encode(idb));
        let rec = KeyRecord {
            id: id.clone(),
            name: k.name.clone(),
            prefix: secret[..14].to_string(),
            subject: k
                .subject
                .clone()
                .unwrap_or_else(|| format!("key:{}", k.name)),
            models: k.models.clone(),
            rpm: k.rpm.filter(|&v| v > 0),
            tpm: k.tpm.filter(|&v| v > 0),
            concurrent: k.concurrent.filter(|&v| v > 0),
            max_tokens: k.max_tokens.filter(|&v| v > 0),
            priority: k.priority,
            created_ms: now_ms(),
            expires_ms: k.expires_ms,
            revoked_ms: None,
            admin: false,
        };
        execute!(
            &self.db,
            "INSERT INTO api_keys (id, hash, name, prefix, subject, models, rpm, tpm, concurrent, created_ms, expires_ms, max_tokens, priority)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "INSERT INTO api_keys (id, hash, name, prefix, subject, models, rpm, tpm, concurrent, created_ms, expires_ms, max_tokens, priority)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            &rec.id,
            hash(&secret).to_vec(),
            &rec.name,
            &rec.prefix,
            &rec.subject,
            serde_json::to_string(&rec.models).unwrap_or_else(|_| "[]".into()),
            rec.rpm.map(i64::from),
            rec.tpm.map(i64::from),
            rec.concurrent.map(i64::from),
            rec.created_ms as i64,
            rec.expires_ms.map(|v| v as i64),
            rec.max_tokens.map(i64::from),
            rec.priority.map(i64::from),
        )?;
        self.reload().await?;
        self.announce(&rec.id).await?;
        Ok((secret, rec))
    }

    /// Revoke a key (it stops working at once).
    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, KeyError> {
        let n = execute!(
            &self.db,
            "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
            "UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL",
            now_ms() as i64,
            id,
        )?;
        self.reload().await?;
        if n > 0 {
            self.announce(id).await?;
        }
        let rec = self.list().into_iter().find(|k| k.id == id);
        match (n, rec) {
            (_, Some(r)) => Ok(r),
            (_, None) => Err(KeyError::NotFound(id.to_string())),
        }
    }

    /// Change a key's name, patterns, limits or expiry. Takes effect for its next request (the
    /// in-memory copy is reloaded before this returns).
    pub async fn update(&self, id: &str, u: KeyUpdate) -> Result<KeyRecord, KeyError> {
        let Some(mut rec) = self.list().into_iter().find(|k| k.id == id) else {
            return Err(KeyError::NotFound(id.to_string()));
        };
        if rec.revoked_ms.is_some() {
            return Err(KeyError::Revoked(id.to_string()));
        }
        if let Some(name) = u.name {
            check_name(&name)?;
            rec.name = name;
        }
        if let Some(models) = u.models {
            check_models(&models)?;
            rec.models = models;
        }
        if let Some((rpm, tpm, concurrent)) = u.limits {
            rec.rpm = rpm.filter(|&v| v > 0);
            rec.tpm = tpm.filter(|&v| v > 0);
            rec.concurrent = concurrent.filter(|&v| v > 0);
        }
        if let Some(m) = u.max_tokens {
            rec.max_tokens = Some(m).filter(|&v| v > 0);
        }
        if let Some(p) = u.priority {
            rec.priority = p;
        }
        if let Some(e) = u.expires_ms {
            if e != 0 && e <= now_ms() {
                return Err(KeyError::Invalid {
                    field: "expires_at_ms",
                    message: "in the past".into(),
                });
            }
            rec.expires_ms = Some(e).filter(|&e| e != 0);
        }
        execute!(
            &self.db,
            "UPDATE api_keys SET name = ?, models = ?, rpm = ?, tpm = ?, concurrent = ?, expires_ms = ?,
             max_tokens = ?, priority = ? WHERE id = ? AND revoked_ms IS NULL",
            "UPDATE api_keys SET name = $1, models = $2, rpm = $3, tpm = $4, concurrent = $5, expires_ms = $6,
             max_tokens = $7, priority = $8 WHERE id = $9 AND revoked_ms IS NULL",
            &rec.name,
            serde_json::to_string(&rec.models).unwrap_or_else(|_| "[]".into()),
            rec.rpm.map(i64::from),
            rec.tpm.map(i64::from),
            rec.concurrent.map(i64::from),
            rec.expires_ms.map(|v| v as i64),
            rec.max_tokens.map(i64::from),
            rec.priority.map(i64::from),
            id,
        )?;
        self.reload().await?;
        self.announce(id).await?;
        self.list()
            .into_iter()
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::NotFound(id.to_string()))
    }

    pub fn list(&self) -> Vec<KeyRecord> {
        let mut v: Vec<KeyRecord> = self
            .by_hash
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.read().map(|m| m.is_empty()).unwrap_or(true)
    }

    /// The record of a presented secret, if it is a known key (active or not).
    pub fn lookup(&self, secret: &str) -> Option<KeyRecord> {
        let h = hash(secret);
        let map = self.by_hash.read().ok()?;
        // The map finds the candidate by hash; the final comparison is constant-time.
        let (stored, rec) = map.get_key_value(&h)?;
        bool::from(stored.ct_eq(&h)).then(|| rec.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn updates_take_effect_at_once_and_bad_updates_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = KeyStore::open(&d.path().join("keys.db")).await.unwrap();
        let (secret, rec) = s
            .create(NewKey {
                name: "app".into(),
                models: vec!["tiny*".into()],
                rpm: Some(5),
                ..Default::default()
            })
            .await
            .unwrap();
        let up = s
            .update(
                &rec.id,
                KeyUpdate {
                    models: Some(vec!["big".into()]),
                    limits: Some((Some(7), None, Some(0))),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (up.name.as_str(), up.rpm, up.concurrent),
            ("app", Some(7), None)
        );
        let seen = s.lookup(&secret).unwrap();
        assert!(seen.allows("big") && !seen.allows("tiny"));
        for bad in [
            KeyUpdate {
                models: Some(vec![]),
                ..Default::default()
            },
            KeyUpdate {
                name: Some(" ".into()),
                ..Default::default()
            },
            KeyUpdate {
                expires_ms: Some(1),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                s.update(&rec.id, bad).await,
                Err(KeyError::Invalid { .. })
            ));
        }
        assert_eq!(
            s.lookup(&secret).unwrap(),
            seen,
            "a refused update changes nothing"
        );
        assert!(matches!(
            s.update("key_nope", KeyUpdate::default()).await,
            Err(KeyError::NotFound(_))
        ));
        let reopened = KeyStore::open(&d.path().join("keys.db")).await.unwrap();
        assert_eq!(reopened.lookup(&secret).unwrap(), seen);
    }

    /// A key database from before per-key `max_tokens` opens, keeps its keys and takes the new
    /// limit.
    #[tokio::test]
    async fn older_databases_get_the_max_tokens_column() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("keys.db");
        let s = KeyStore::open(&path).await.unwrap();
        let (old_secret, _) = s
            .create(NewKey {
                name: "old".into(),
                models: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let Db::Sqlite(pool) = &s.db else {
            unreachable!("opened as SQLite")
        };
        sqlx::query("ALTER TABLE api_keys DROP COLUMN max_tokens")
            .execute(pool)
            .await
            .unwrap();
        pool.close().await;
        let s = KeyStore::open(&path).await.unwrap();
        assert_eq!(s.lookup(&old_secret).unwrap().max_tokens, None);
        let (secret, rec) = s
            .create(NewKey {
                name: "new".into(),
                models: vec!["*".into()],
                max_tokens: Some(64),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rec.max_tokens, Some(64));
        let up = s
            .update(
                &rec.id,
                KeyUpdate {
                    max_tokens: Some(32),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(up.max_tokens, Some(32));
        let reopened = KeyStore::open(&path).await.unwrap();
        assert_eq!(reopened.lookup(&secret).unwrap().max_tokens, Some(32));
    }

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("llama*", "llama-3-8b"));
        assert!(!glob("llama*", "qwen"));
        assert!(glob("*-q4*", "x-q4_k_m"));
        assert!(glob("tiny", "tiny"));
        assert!(!glob("tiny", "tiny2"));
        assert!(!glob("a*a", "a"));
    }

    #[tokio::test]
    async fn keys_are_hashed_shown_once_and_revocable() {
        let d = tempfile::tempdir().unwrap();
        let s = KeyStore::open(&d.path().join("keys.db")).await.unwrap();
        let (secret, rec) = s
            .create(NewKey {
                name: "ci".into(),
                models: vec!["tiny*".into()],
                rpm: Some(5),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(secret.starts_with("sk-slm-") && secret.len() == 7 + 64);
        assert_eq!(s.lookup(&secret).unwrap().id, rec.id);
        assert!(s.lookup("sk-slm-wrong").is_none());
        assert!(rec.allows("tiny") && !rec.allows("big"));
        let db = std::fs::read(d.path().join("keys.db")).unwrap();
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is never stored"
        );
        s.revoke(&rec.id).await.unwrap();
        assert!(!s.lookup(&secret).unwrap().active(now_ms()));
        assert!(
            s.create(NewKey {
                name: "".into(),
                models: vec!["*".into()],
                ..Default::default()
            })
            .await
            .is_err()
        );
        assert!(
            s.create(NewKey {
                name: "x".into(),
                ..Default::default()
            })
            .await
            .is_err()
        );
        assert!(matches!(
            s.update(&rec.id, KeyUpdate::default()).await,
            Err(KeyError::Revoked(_))
        ));
        let reopened = KeyStore::open(&d.path().join("keys.db")).await.unwrap();
        assert_eq!(reopened.list().len(), 1);
    }
}
