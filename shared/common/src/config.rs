//! Configuration: one TOML file, a section per service (`[scheduler]`, `[registry]`, `[backend]`,
//! `[gateway]`, `[models]`).
//!
//! Precedence: command-line flags (and the environment variables clap maps onto them) override the
//! file, which overrides built-in defaults. Unknown keys are errors, so a typo never silently falls
//! back to a default; the error names the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("invalid configuration: field `{field}`: {message}")]
    Field { field: String, message: String },
}

/// Read and parse a TOML file into `T`; without a path, `T::default()`.
pub fn load_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parse TOML text; `origin` only names the source in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: origin.to_path_buf(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

/// The default data directory: `$XDG_DATA_HOME/securellm` or `~/.local/share/securellm`, else
/// `./.data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("securellm");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/securellm");
    }
    PathBuf::from(".data")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        #[serde(default)]
        port: u16,
    }

    #[test]
    fn unknown_key_is_named() {
        let ok: Demo = parse("port = 5", Path::new("x.toml")).unwrap();
        assert_eq!(ok.port, 5);
        let e = parse::<Demo>("prot = 5", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse::<Demo>("port = \"high\"", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = load_file::<Demo>(Some(Path::new("/nonexistent/securellm.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/securellm.toml"));
    }
}

/// `--check-config FILE`, as `nginx -t`: validate a service's configuration without starting
/// it, for the NixOS module's build-time check and for operators. `own` parses and validates the
/// service's own sections (it must create nothing: no token, no database, no directory); the
/// shared `[telemetry]` section is checked here, without the `OTEL_*` environment (the run-time
/// environment is not the checker's). Prints `<service>: FILE: configuration is valid` on stdout,
/// or the error naming the field on stderr, and exits 0 or 1.
pub fn check_and_exit<E: std::fmt::Display>(
    service: &str,
    file: &Path,
    own: impl FnOnce() -> Result<(), E>,
) -> ! {
    let result = (|| -> Result<(), String> {
        let telemetry: crate::telemetry::TelemetryConfig =
            load_section(Some(file), "telemetry").map_err(|e| e.to_string())?;
        telemetry
            .resolve(service, |_| None)
            .map_err(|e| e.to_string())?;
        own().map_err(|e| e.to_string())
    })();
    match result {
        Ok(()) => {
            println!("{service}: {}: configuration is valid", file.display());
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{service}: {}: {e}", file.display());
            std::process::exit(1)
        }
    }
}

/// The sections a SecureLLM config file may have.
pub const SECTIONS: &[&str] = &[
    "scheduler",
    "registry",
    "backend",
    "gateway",
    "models",
    "telemetry",
    "storage",
    "internal_tls",
];

/// Read one section of the shared config file into `T` (defaults when the file or the section is
/// absent). Unknown sections and unknown keys are errors naming them, e.g. `scheduler.reserv`.
pub fn load_section<T: DeserializeOwned + Default>(
    path: Option<&Path>,
    section: &str,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    section_from_str(&text, path, section)
}

/// [`load_section`] with `flags` on top: every field `flags` serializes replaces the file's value
/// of the same name, so precedence (flag or its environment variable > file > default) is one
/// merge, not an `if let` per flag. `flags` is the service's clap `Args` deriving `Serialize`:
/// `None` fields are not serialized (TOML has no null), fields that are not settings are
/// `#[serde(skip)]`, and a flag named differently from its key is `#[serde(rename)]`d. The merged
/// section is checked as a file's would be (unknown keys, types), the error naming the key.
pub fn load_section_with<T: DeserializeOwned + Default, F: serde::Serialize>(
    path: Option<&Path>,
    section: &str,
    flags: &F,
) -> Result<T, ConfigError> {
    let mut table = match path {
        None => toml::Table::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            // Checks the section names and the section's own keys and types first.
            let _: T = section_from_str(&text, path, section)?;
            let mut all: toml::Table = parse(&text, path)?;
            match all.remove(section) {
                Some(toml::Value::Table(t)) => t,
                _ => toml::Table::new(),
            }
        }
    };
    let over = toml::Table::try_from(flags).map_err(|e| ConfigError::Field {
        field: section.to_string(),
        message: format!("flags: {e}"),
    })?;
    table.extend(over);
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Field {
            field: section.to_string(),
            message: format!(
                "flags over the file: {}",
                e.to_string().trim().replace('\n', " ")
            ),
        })
}

/// [`load_section`] over text already read; `origin` only names the source in errors.
pub fn section_from_str<T: DeserializeOwned + Default>(
    text: &str,
    origin: &Path,
    section: &str,
) -> Result<T, ConfigError> {
    let table: toml::Table = parse(text, origin)?;
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            return Err(ConfigError::Field {
                field: key.clone(),
                message: format!("unknown section; expected one of {}", SECTIONS.join(", ")),
            });
        }
    }
    match table.get(section) {
        None => Ok(T::default()),
        Some(v) => v
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                path: origin.to_path_buf(),
                message: format!("[{section}] {}", e.to_string().trim().replace('\n', " ")),
            }),
    }
}

#[cfg(test)]
mod section_tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sched {
        reserve: u64,
    }

    #[test]
    fn reads_its_section_and_ignores_others() {
        let t = "[scheduler]\nreserve = 7\n[gateway]\nanything = 1\n";
        let s: Sched = section_from_str(t, Path::new("c.toml"), "scheduler").unwrap();
        assert_eq!(s, Sched { reserve: 7 });
        let s: Sched = section_from_str("", Path::new("c.toml"), "scheduler").unwrap();
        assert_eq!(s, Sched::default());
    }

    #[test]
    fn names_unknown_sections_and_keys() {
        let e = section_from_str::<Sched>("[shceduler]\n", Path::new("c.toml"), "scheduler")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shceduler"), "{e}");
        let e = section_from_str::<Sched>(
            "[scheduler]\nreserv = 1\n",
            Path::new("c.toml"),
            "scheduler",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("reserv") && e.contains("[scheduler]"), "{e}");
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Section {
        listen: String,
        grace_ms: u64,
        reserve: crate::ByteSize,
        gpus: Vec<crate::ByteSize>,
    }

    #[derive(serde::Serialize)]
    struct Flags {
        #[serde(skip)]
        #[allow(dead_code)]
        config: Option<std::path::PathBuf>,
        listen: Option<String>,
        grace_ms: Option<u64>,
        reserve: Option<crate::ByteSize>,
        #[serde(rename = "gpus", skip_serializing_if = "Vec::is_empty")]
        gpu: Vec<crate::ByteSize>,
    }

    #[test]
    fn flags_override_the_file_and_unset_flags_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[scheduler]\nlisten = \"0.0.0.0:1\"\ngrace_ms = 7\nreserve = \"1GiB\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: None,
            listen: Some("127.0.0.1:2".into()),
            grace_ms: None,
            reserve: Some(crate::ByteSize((1 << 30) + 1)),
            gpu: vec![crate::ByteSize(24 << 30)],
        };
        let c: Section = load_section_with(Some(&f), "scheduler", &flags).unwrap();
        assert_eq!(
            c,
            Section {
                listen: "127.0.0.1:2".into(),
                grace_ms: 7,
                // Exact, not the rounded display form.
                reserve: crate::ByteSize((1 << 30) + 1),
                gpus: vec![crate::ByteSize(24 << 30)],
            }
        );
        // No file: defaults under the flags.
        let none = Flags {
            config: None,
            listen: None,
            grace_ms: Some(3),
            reserve: None,
            gpu: vec![],
        };
        let c: Section = load_section_with(None, "scheduler", &none).unwrap();
        assert_eq!(c.grace_ms, 3);
        assert_eq!(c.listen, "");
        // A bad file is still named as the file's error, flags or not.
        std::fs::write(&f, "[scheduler]\nlisen = 1\n").unwrap();
        let e = load_section_with::<Section, _>(Some(&f), "scheduler", &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen") && e.contains("c.toml"), "{e}");
    }
}
