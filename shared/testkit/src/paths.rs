//! Where the tests' outside parts are: llama-server, Python with the openai package, the fakes.

use std::path::{Path, PathBuf};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$SECURELLM_CACHE_DIR`, else `~/.cache/securellm` (where `make llama-server` and `make pyenv`
/// put their builds).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SECURELLM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/securellm")
        })
}

/// The llama-server binary: `$LLAMA_SERVER`, else the installer's cached build, else what
/// `scripts/install-llama-server.sh` prints (it builds one: minutes).
pub fn try_llama_server() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LLAMA_SERVER") {
        return Ok(p.into());
    }
    let cached = cache_dir().join("llama.cpp/bin/llama-server");
    if cached.is_file() {
        return Ok(cached);
    }
    let script = workspace_root().join("scripts/install-llama-server.sh");
    let out = std::process::Command::new(&script)
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "llama-server is needed: set LLAMA_SERVER or run `make llama-server` ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim(),
    ))
}

/// [`try_llama_server`], panicking with its message.
pub fn llama_server() -> PathBuf {
    try_llama_server().unwrap_or_else(|e| panic!("{e}"))
}

/// Python with the official `openai` package: `$SECURELLM_TEST_PYTHON`, else the venv
/// `make pyenv` makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SECURELLM_TEST_PYTHON") {
        return p.into();
    }
    let p = cache_dir().join("pyenv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run `make pyenv` (a venv with the openai package) or set \
         SECURELLM_TEST_PYTHON",
        p.display()
    );
    p
}

/// Run a Python client script (the official `openai` package, from [`python`]) with `env`; it
/// must exit 0 with `OK` as its last line. Returns its stdout.
pub async fn run_python_client(script: &Path, env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(python())
        .arg(script)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "python client {} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    stdout
}

/// A fake engine or daemon in `tests/fakes/` (they speak the real HTTP APIs).
pub fn fake(name: &str) -> PathBuf {
    workspace_root()
        .join("tests/fakes")
        .join(name)
        .canonicalize()
        .expect("tests/fakes")
}

/// Where the workspace's binaries are: beside the test's executable (`target/debug/deps/x` →
/// `target/debug/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

/// A workspace binary, which must have been built.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} missing: build the workspace's binaries first (cargo build --workspace --bins; \
         `cargo nextest run --workspace` does it)",
        p.display()
    );
    p
}
