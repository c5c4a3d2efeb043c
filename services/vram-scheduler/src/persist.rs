//! The lease table survives a scheduler restart through a snapshot file in the data directory.
//!
//! The snapshot (JSON, written to a temporary file and renamed over the old one, so a crash never
//! leaves half a file) holds the live leases and simulated foreign use. It is written at most every
//! `interval` while something changed, so a crash can lose the last interval's changes; holders
//! cover that window with `Reattach`, which restores leases the scheduler does not know if they
//! still fit. On start the scheduler loads the snapshot and gives every lease a fresh TTL, so its
//! holder has time to reconnect before anything expires.

use std::path::{Path, PathBuf};

use crate::table::Snapshot;

/// Errors reading or writing the snapshot.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot write lease snapshot {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read lease snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lease snapshot {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// The snapshot file inside a data directory.
pub fn snapshot_path(data_dir: &Path) -> PathBuf {
    data_dir.join("scheduler-leases.json")
}

/// Write atomically and durably: a temporary file (mode 0600: lease ids are capabilities to
/// release memory), fsync, rename over the old one, fsync of the directory. The directory is kept
/// 0700.
pub fn save(path: &Path, snap: &Snapshot) -> Result<(), PersistError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let w = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let json = serde_json::to_vec_pretty(snap).map_err(|e| w(std::io::Error::other(e)))?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(w)?;
    f.write_all(&json).map_err(w)?;
    f.sync_all().map_err(w)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(w)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(w)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(w)?;
    }
    Ok(())
}

/// Read a snapshot; a missing file is an empty snapshot.
pub fn load(path: &Path) -> Result<Snapshot, PersistError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
        Err(source) => {
            return Err(PersistError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| PersistError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = snapshot_path(dir.path());
        assert_eq!(load(&p).unwrap(), Snapshot::default());
        let snap = Snapshot {
            leases: vec![],
            simulated_foreign: vec![(0, 42)],
        };
        save(&p, &snap).unwrap();
        assert_eq!(load(&p).unwrap(), snap);
        // For the service only: the file 0600, its directory 0700.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(load(&p), Err(PersistError::Corrupt { .. })));
    }
}
