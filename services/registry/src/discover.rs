//! Discovery: walk the model roots and say which files make up which model, without parsing them.
//!
//! Finds single GGUF files, split GGUF (`name-00001-of-00003.gguf`, grouped), Ollama stores (a
//! directory with `manifests/` and `blobs/`: each manifest names a GGUF model blob), and Hugging
//! Face safetensors folders (`config.json` plus `*.safetensors` or an index). `mmproj*.gguf` files
//! are projectors of the GGUF models beside them, not models.
//!
//! Safety: directory symlinks are never followed (no loops); a file symlink is followed only when
//! its target lies under a configured root; unreadable directories and vanished files are recorded
//! as failures and the walk goes on; depth is bounded.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Directories deeper than this below a root are not walked.
const MAX_DEPTH: usize = 24;

/// Size and modification time of one file, the key of incremental rescans.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ms: u64,
}

/// An Ollama manifest and what it points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OllamaCandidate {
    pub manifest: FileStamp,
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

/// A set of files that should form one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidate {
    Gguf {
        root: PathBuf,
        file: FileStamp,
        projectors: Vec<FileStamp>,
    },
    GgufSplit {
        root: PathBuf,
        stem: String,
        count: u32,
        parts: BTreeMap<u32, FileStamp>,
    },
    Ollama {
        root: PathBuf,
        store: PathBuf,
        manifest: OllamaCandidate,
    },
    Safetensors {
        root: PathBuf,
        dir: PathBuf,
        files: Vec<FileStamp>,
    },
}

impl Candidate {
    pub fn root(&self) -> &Path {
        match self {
            Candidate::Gguf { root, .. }
            | Candidate::GgufSplit { root, .. }
            | Candidate::Ollama { root, .. }
            | Candidate::Safetensors { root, .. } => root,
        }
    }

    /// The files discovery saw for this candidate (what decides "unchanged").
    pub fn stamps(&self) -> Vec<&FileStamp> {
        match self {
            Candidate::Gguf {
                file, projectors, ..
            } => std::iter::once(file).chain(projectors).collect(),
            Candidate::GgufSplit { parts, .. } => parts.values().collect(),
            Candidate::Ollama { manifest, .. } => vec![&manifest.manifest],
            Candidate::Safetensors { files, .. } => files.iter().collect(),
        }
    }
}

/// What a walk found.
#[derive(Debug, Default)]
pub struct Discovery {
    pub candidates: Vec<Candidate>,
    /// Paths that could not be read, with the reason.
    pub failures: Vec<(PathBuf, String)>,
    /// Regular files looked at.
    pub files_seen: u64,
}

/// Stat a file (following a symlink) into a stamp.
pub fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let md = std::fs::metadata(path)?;
    let mtime_ms = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok(FileStamp {
        path: path.to_path_buf(),
        size: md.len(),
        mtime_ms,
    })
}

/// Parse `name-00001-of-00003.gguf` into (`name`, 1, 3).
pub fn split_name(file_name: &str) -> Option<(String, u32, u32)> {
    let base = file_name.strip_suffix(".gguf")?;
    let (rest, count) = base.rsplit_once("-of-")?;
    let (stem, index) = rest.rsplit_once('-')?;
    if index.len() != 5 || count.len() != 5 || stem.is_empty() {
        return None;
    }
    let index: u32 = index.parse().ok()?;
    let count: u32 = count.parse().ok()?;
    (index >= 1 && count >= 1 && index <= count).then(|| (stem.to_string(), index, count))
}

/// Split parts grouped by (directory, stem, part count) → (root, parts by number).
type SplitGroups = BTreeMap<(PathBuf, String, u32), (PathBuf, BTreeMap<u32, FileStamp>)>;

struct Walker<'a> {
    roots: &'a [PathBuf],
    out: Discovery,
    visited: HashSet<PathBuf>,
    splits: SplitGroups,
}

/// Is `p` (canonical) under one of the (canonical) roots?
fn under_roots(p: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| p.starts_with(r))
}

/// Walk every root. Roots that do not exist are failures, not errors.
pub fn discover(roots: &[PathBuf]) -> Discovery {
    let canonical: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let mut w = Walker {
        roots: &canonical,
        out: Discovery::default(),
        visited: HashSet::new(),
        splits: BTreeMap::new(),
    };
    for (root, canon) in roots.iter().zip(roots.iter().map(std::fs::canonicalize)) {
        match canon {
            Ok(c) if c.is_dir() => w.walk_dir(&c, &c, 0),
            Ok(c) => w
                .out
                .failures
                .push((c, "model root is not a directory".into())),
            Err(e) => w
                .out
                .failures
                .push((root.clone(), format!("model root cannot be read: {e}"))),
        }
    }
    let splits = std::mem::take(&mut w.splits);
    for ((_, stem, count), (root, parts)) in splits {
        w.out.candidates.push(Candidate::GgufSplit {
            root,
            stem,
            count,
            parts,
        });
    }
    w.out
}

impl Walker<'_> {
    fn fail(&mut self, p: &Path, why: impl std::fmt::Display) {
        self.out.failures.push((p.to_path_buf(), why.to_string()));
    }

    fn walk_dir(&mut self, root: &Path, dir: &Path, depth: usize) {
        if depth > MAX_DEPTH {
            self.fail(
                dir,
                format!("deeper than {MAX_DEPTH} levels below the root; not walked"),
            );
            return;
        }
        if !self.visited.insert(dir.to_path_buf()) {
            return;
        }
        // Special layouts first: an Ollama store or a safetensors folder is one unit.
        if dir.join("manifests").is_dir() && dir.join("blobs").is_dir() {
            self.ollama_store(root, dir);
            return;
        }
        if dir.join("config.json").is_file() && self.safetensors_dir(root, dir) {
            return;
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => return self.fail(dir, format!("cannot list directory: {e}")),
        };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        let mut ggufs = Vec::new();
        let mut projectors = Vec::new();
        for path in names {
            let md = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    self.fail(&path, format!("vanished or unreadable: {e}"));
                    continue;
                }
            };
            let ft = md.file_type();
            if ft.is_dir() {
                self.walk_dir(root, &path, depth + 1);
                continue;
            }
            if ft.is_symlink() {
                match std::fs::canonicalize(&path) {
                    Ok(t) if t.is_file() && under_roots(&t, self.roots) => {}
                    Ok(t) if t.is_dir() => continue, // never follow directory links
                    Ok(_) => {
                        if is_gguf(&path) {
                            self.fail(
                                &path,
                                "symlink target lies outside the model roots; ignored",
                            );
                        }
                        continue;
                    }
                    Err(e) => {
                        if is_gguf(&path) {
                            self.fail(&path, format!("broken symlink: {e}"));
                        }
                        continue;
                    }
                }
            } else if !ft.is_file() {
                continue;
            }
            self.out.files_seen += 1;
            if !is_gguf(&path) {
                continue;
            }
            let st = match stamp(&path) {
                Ok(s) => s,
                Err(e) => {
                    self.fail(&path, format!("vanished or unreadable: {e}"));
                    continue;
                }
            };
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.to_ascii_lowercase().starts_with("mmproj") {
                projectors.push(st);
            } else if let Some((stem, index, count)) = split_name(name) {
                let e = self
                    .splits
                    .entry((dir.to_path_buf(), stem, count))
                    .or_insert_with(|| (root.to_path_buf(), BTreeMap::new()));
                e.1.insert(index, st);
            } else {
                ggufs.push(st);
            }
        }
        for file in ggufs {
            self.out.candidates.push(Candidate::Gguf {
                root: root.to_path_buf(),
                file,
                projectors: projectors.clone(),
            });
        }
    }

    fn ollama_store(&mut self, root: &Path, store: &Path) {
        let manifests = store.join("manifests");
        let mut stack = vec![(manifests.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    self.fail(&dir, format!("cannot list directory: {e}"));
                    continue;
                }
            };
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for p in paths {
                let Ok(md) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if md.is_dir() && depth < 4 {
                    stack.push((p, depth + 1));
                } else if md.is_file() {
                    self.out.files_seen += 1;
                    // manifests/<host>/<namespace>/<model>/<tag>
                    let rel: Vec<String> = p
                        .strip_prefix(&manifests)
                        .map(|r| r.iter().map(|c| c.to_string_lossy().into_owned()).collect())
                        .unwrap_or_default();
                    if rel.len() != 4 {
                        self.fail(
                            &p,
                            "not a manifest (expected manifests/<host>/<namespace>/<model>/<tag>)",
                        );
                        continue;
                    }
                    match stamp(&p) {
                        Ok(st) => self.out.candidates.push(Candidate::Ollama {
                            root: root.to_path_buf(),
                            store: store.to_path_buf(),
                            manifest: OllamaCandidate {
                                manifest: st,
                                host: rel[0].clone(),
                                namespace: rel[1].clone(),
                                model: rel[2].clone(),
                                tag: rel[3].clone(),
                            },
                        }),
                        Err(e) => self.fail(&p, format!("vanished or unreadable: {e}")),
                    }
                }
            }
        }
    }

    /// A folder with config.json and safetensors weights; false if it has no weights.
    fn safetensors_dir(&mut self, root: &Path, dir: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        let mut files: Vec<FileStamp> = Vec::new();
        let mut has_weights = false;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            let wanted = name.ends_with(".safetensors")
                || name == "config.json"
                || name == "model.safetensors.index.json"
                || name == "tokenizer_config.json";
            if !wanted || !p.is_file() {
                continue;
            }
            if let Ok(real) = std::fs::canonicalize(&p)
                && !under_roots(&real, self.roots)
            {
                continue;
            }
            self.out.files_seen += 1;
            has_weights |= name.ends_with(".safetensors") || name == "model.safetensors.index.json";
            if let Ok(st) = stamp(&p) {
                files.push(st);
            }
        }
        if has_weights {
            self.out.candidates.push(Candidate::Safetensors {
                root: root.to_path_buf(),
                dir: dir.to_path_buf(),
                files,
            });
        }
        has_weights
    }
}

fn is_gguf(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(
            split_name("qwen-7b-00002-of-00003.gguf"),
            Some(("qwen-7b".into(), 2, 3))
        );
        assert_eq!(split_name("model.gguf"), None);
        assert_eq!(split_name("m-00004-of-00003.gguf"), None);
        assert_eq!(split_name("m-0001-of-0003.gguf"), None);
        assert_eq!(split_name("-00001-of-00003.gguf"), None);
    }
}
