//! SQLite persistence (sqlx, WAL, embedded migrations): the models table mirrors the in-memory
//! catalogue; the measurements table keeps what the backend manager measured.

use std::path::Path;
use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::estimate::{Breakdown, CacheType};
use crate::record::ModelRecord;

/// Database errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
}

/// The key of a measurement, defaults already resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeasurementKey {
    pub context: u64,
    pub parallel: u32,
    pub cache: CacheType,
    pub gpu_layers: u32,
}

/// A stored measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    pub terms: Breakdown,
    pub source: String,
    pub measured_ms: u64,
}

/// Make `path`'s directory 0700 and the file itself 0600 (creating it empty if missing).
fn private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    for ext in ["-wal", "-shm"] {
        let side = std::path::PathBuf::from(format!("{}{ext}", path.display()));
        if side.exists() {
            std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Open (creating) the database file and run migrations. The file is for the service only:
    /// created 0600 (SQLite gives its -wal / -shm files the same mode) in a 0700 directory, and
    /// tightened to that when found looser.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        private(path).map_err(|source| StoreError::File {
            path: path.display().to_string(),
            source,
        })?;
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    pub async fn load_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let rows = sqlx::query("SELECT record FROM models")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("record")?;
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                    table: "models",
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Upsert and delete in one transaction.
    pub async fn apply(
        &self,
        upserts: &[ModelRecord],
        removals: &[String],
    ) -> Result<(), StoreError> {
        if upserts.is_empty() && removals.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for m in upserts {
            let json = serde_json::to_string(m).map_err(|e| StoreError::Corrupt {
                table: "models",
                message: e.to_string(),
            })?;
            sqlx::query(
                "INSERT INTO models (id, name, fingerprint, first_seen_ms, record) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT(id) DO UPDATE SET name = excluded.name, fingerprint = excluded.fingerprint, record = excluded.record",
            )
            .bind(&m.id)
            .bind(&m.name)
            .bind(&m.fingerprint)
            .bind(m.first_seen_ms as i64)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        for id in removals {
            sqlx::query("DELETE FROM models WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn measurement(
        &self,
        model_id: &str,
        k: MeasurementKey,
    ) -> Result<Option<Measurement>, StoreError> {
        let row = sqlx::query(
            "SELECT terms, source, measured_ms FROM measurements
             WHERE model_id = ? AND context = ? AND parallel = ? AND cache_type = ? AND gpu_layers = ?",
        )
        .bind(model_id)
        .bind(k.context as i64)
        .bind(k.parallel as i64)
        .bind(k.cache.as_flag())
        .bind(k.gpu_layers as i64)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let terms: String = row.try_get("terms")?;
        let terms: Breakdown = serde_json::from_str(&terms).map_err(|e| StoreError::Corrupt {
            table: "measurements",
            message: e.to_string(),
        })?;
        Ok(Some(Measurement {
            terms,
            source: row.try_get("source")?,
            measured_ms: row.try_get::<i64, _>("measured_ms")? as u64,
        }))
    }

    /// Store a measurement; true if it replaced one.
    pub async fn put_measurement(
        &self,
        model_id: &str,
        k: MeasurementKey,
        m: &Measurement,
    ) -> Result<bool, StoreError> {
        let existed = self.measurement(model_id, k).await?.is_some();
        let terms = serde_json::to_string(&m.terms).map_err(|e| StoreError::Corrupt {
            table: "measurements",
            message: e.to_string(),
        })?;
        sqlx::query(
            "INSERT INTO measurements (model_id, context, parallel, cache_type, gpu_layers, terms, source, measured_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(model_id, context, parallel, cache_type, gpu_layers)
             DO UPDATE SET terms = excluded.terms, source = excluded.source, measured_ms = excluded.measured_ms",
        )
        .bind(model_id)
        .bind(k.context as i64)
        .bind(k.parallel as i64)
        .bind(k.cache.as_flag())
        .bind(k.gpu_layers as i64)
        .bind(terms)
        .bind(&m.source)
        .bind(m.measured_ms as i64)
        .execute(&self.pool)
        .await?;
        Ok(existed)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// The catalogue is for the service only: 0600 in a 0700 directory, also when an older
    /// version left it world-readable.
    #[tokio::test]
    async fn the_database_is_private_to_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("registry");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let db = data.join("registry.db");
        let s = Store::open(&db).await.unwrap();
        s.close().await;
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&data), 0o700);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(&db).await.unwrap();
        assert!(s.load_models().await.unwrap().is_empty());
        assert_eq!(mode(&db), 0o600);
        for side in ["registry.db-wal", "registry.db-shm"] {
            let p = data.join(side);
            if p.exists() {
                assert_eq!(mode(&p), 0o600, "{side}");
            }
        }
    }
}
