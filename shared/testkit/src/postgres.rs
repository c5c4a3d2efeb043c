//! A throw-away PostgreSQL cluster per test: Debian's `postgresql` binaries (`make postgres`
//! installs them), `initdb` into a temporary directory, the server on a unix socket in that
//! directory only (no TCP), trust authentication, stopped (`-m immediate`) and removed on drop.
//! Starting one takes a few seconds. As root (CI), the cluster runs as the `postgres` user.
//!
//! ```text
//! let Some(pg) = Postgres::start_or_skip("my test") else { return };
//! let url = pg.create_database("gw");   // postgres://postgres@localhost/gw?host=<socket dir>
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A running throw-away cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`, or `initdb` on `PATH`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().or_else(|| {
        Command::new("initdb")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|_| {
                std::env::split_paths(&std::env::var_os("PATH")?)
                    .find(|p| p.join("initdb").is_file())
            })
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Postgres {
    /// Start a cluster; `Err` says why none could be (no binaries, initdb or start failed).
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir().ok_or("PostgreSQL is not installed (`make postgres` installs it)")?;
        let dir = tempfile::Builder::new()
            .prefix("securellm-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("chown of the cluster directory to postgres failed".into());
            }
        }
        let pg = Self {
            dir,
            bin,
            as_postgres,
        };
        let data = pg.data_dir();
        let out = pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    /// [`Self::start`], or `None` with a loud warning naming the test that is skipped.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("WARNING: SKIPPED {test}: no throw-away PostgreSQL: {e}");
                None
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<Output, String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| format!("run {tool}: {e}"))
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let data = self.data_dir();
        let opts = format!(
            "-k {} -c listen_addresses= -c fsync=off -c max_connections=200",
            self.socket_dir().display()
        );
        let log = self.dir.path().join("server.log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start failed: {} {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Stop the server at once (as a crash would), keeping its data.
    pub fn stop(&self) {
        let data = self.data_dir();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Start it again after [`Self::stop`].
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// Run SQL with `psql` against `db`; its stdout.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let host = self.socket_dir().to_str().unwrap().to_string();
        let out = self.run(
            "psql",
            &[
                "-h",
                &host,
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Create database `name`; its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(name)
    }

    /// The URL of database `name` (over the unix socket).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}",
            self.socket_dir().display()
        )
    }

    /// Wait until the server accepts connections (after a restart).
    pub fn wait_ready(&self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
