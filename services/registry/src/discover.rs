//! Discovery: walk the model roots and say which files make up which model, without parsing them.
//!
//! Finds single GGUF files, split GGUF (`name-00001-of-00003.gguf`, grouped), Ollama stores (a
//! directory with `manifests/` and `blobs/`: each manifest names a GGUF model blob), and Hugging
//! Face safetensors folders (`config.json` plus `*.safetensors` or an index). `mmproj*.gguf` files
//! are projectors of the GGUF models beside them, not models.
//!
//! Safety: directory symlinks are never followed (no loops); a file symlink is followed only when
//! its target lies under a configured root ([`Fence`]); only regular files are taken (a FIFO or
//! device named like a model is recorded as a failure, never opened); a name that is not UTF-8 is
//! recorded as a failure and skipped; unreadable directories and vanished files are recorded as
//! failures and the walk goes on; depth is bounded. Discovery opens no file.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::fence::{self, Fence, FenceError};

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
        /// Files of the folder the fence refused, with the reason (the record is an error).
        refused: Vec<(PathBuf, String)>,
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

/// A stamp from metadata already taken (of the file itself, or of a checked symlink's target).
pub fn stamp_of(path: &Path, md: &std::fs::Metadata) -> FileStamp {
    let mtime_ms = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    FileStamp {
        path: path.to_path_buf(),
        size: md.len(),
        mtime_ms,
    }
}

/// Stamp a file through the fence: a regular file whose real location is under a root, or an
/// error saying why not. Nothing outside the roots is stamped (its size would be listed).
pub fn stamp(fence: &Fence, path: &Path) -> Result<FileStamp, FenceError> {
    let (_, md) = fence.check(path)?;
    Ok(stamp_of(path, &md))
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
    fence: &'a Fence,
    out: Discovery,
    visited: HashSet<PathBuf>,
    splits: SplitGroups,
}

/// One directory entry, as the walk sees it.
enum Entry {
    /// A real directory (never a link to one).
    Dir,
    /// A regular file, or a link to one under a root.
    File(FileStamp),
    /// Skipped (and recorded as a failure when the caller asked for reports).
    Skip,
}

/// Is `p` a real directory (not a link to one)?
fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Walk `roots` (each canonicalized); a file symlink is followed only when its target is under
/// one of `fence`'s roots (all configured roots, which may be more than the ones walked). Roots
/// that do not exist are failures, not errors.
pub fn discover(roots: &[PathBuf], fence: &Fence) -> Discovery {
    let mut w = Walker {
        fence,
        out: Discovery::default(),
        visited: HashSet::new(),
        splits: BTreeMap::new(),
    };
    for root in roots {
        match std::fs::canonicalize(root) {
            Ok(c) if c.to_str().is_none() => w.fail(&c, FenceError::NotUtf8),
            Ok(c) if c.is_dir() => w.walk_dir(&c, &c, 0),
            Ok(c) => w.fail(&c, "model root is not a directory"),
            Err(e) => w.fail(root, format!("model root cannot be read: {e}")),
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

/// The sorted entries of a directory.
fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    Ok(paths)
}

impl Walker<'_> {
    fn fail(&mut self, p: &Path, why: impl std::fmt::Display) {
        self.out.failures.push((p.to_path_buf(), why.to_string()));
    }

    /// Classify one entry. A name that is not UTF-8 is always recorded as a failure (it cannot be
    /// listed); other refusals only when `report`.
    fn entry(&mut self, path: &Path, report: bool) -> Entry {
        if path.to_str().is_none() {
            self.fail(path, FenceError::NotUtf8);
            return Entry::Skip;
        }
        let md = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                if report {
                    self.fail(path, format!("vanished or unreadable: {e}"));
                }
                return Entry::Skip;
            }
        };
        let ft = md.file_type();
        if ft.is_dir() {
            return Entry::Dir;
        }
        if ft.is_symlink() {
            if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                return Entry::Skip; // never follow directory links
            }
            return match stamp(self.fence, path) {
                Ok(st) => Entry::File(st),
                Err(e) => {
                    if report {
                        let why = if e.is_not_found() {
                            format!("broken symlink: {e}")
                        } else {
                            format!("symlink {e}")
                        };
                        self.fail(path, why);
                    }
                    Entry::Skip
                }
            };
        }
        if !ft.is_file() {
            if report {
                self.fail(path, FenceError::NotRegular(fence::kind_name(&md)));
            }
            return Entry::Skip;
        }
        Entry::File(stamp_of(path, &md))
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
        // Special layouts first: an Ollama store or a safetensors folder is one unit. Only real
        // directories count (a `manifests` link is not followed).
        if is_real_dir(&dir.join("manifests")) && is_real_dir(&dir.join("blobs")) {
            self.ollama_store(root, dir);
            return;
        }
        if std::fs::symlink_metadata(dir.join("config.json")).is_ok()
            && self.safetensors_dir(root, dir)
        {
            return;
        }
        let names = match list_dir(dir) {
            Ok(n) => n,
            Err(e) => return self.fail(dir, format!("cannot list directory: {e}")),
        };
        let mut ggufs = Vec::new();
        let mut projectors = Vec::new();
        for path in names {
            let st = match self.entry(&path, is_gguf(&path)) {
                Entry::Dir => {
                    self.walk_dir(root, &path, depth + 1);
                    continue;
                }
                Entry::Skip => continue,
                Entry::File(st) => st,
            };
            self.out.files_seen += 1;
            if !is_gguf(&path) {
                continue;
            }
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
            let paths = match list_dir(&dir) {
                Ok(p) => p,
                Err(e) => {
                    self.fail(&dir, format!("cannot list directory: {e}"));
                    continue;
                }
            };
            for p in paths {
                let st = match self.entry(&p, true) {
                    Entry::Dir if depth < 4 => {
                        stack.push((p, depth + 1));
                        continue;
                    }
                    Entry::Dir | Entry::Skip => continue,
                    Entry::File(st) => st,
                };
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
                self.out.candidates.push(Candidate::Ollama {
                    root: root.to_path_buf(),
                    store: store.to_path_buf(),
                    manifest: OllamaCandidate {
                        manifest: st,
                        host: rel[0].clone(),
                        namespace: rel[1].clone(),
                        model: rel[2].clone(),
                        tag: rel[3].clone(),
                    },
                });
            }
        }
    }

    /// A folder with config.json and safetensors weights; false if it has no weights. Files it
    /// needs that the fence refuses (a link out of the roots, a FIFO) go with the candidate, which
    /// then becomes a record in error with the reason.
    fn safetensors_dir(&mut self, root: &Path, dir: &Path) -> bool {
        let Ok(paths) = list_dir(dir) else {
            return false;
        };
        let mut files: Vec<FileStamp> = Vec::new();
        let mut refused: Vec<(PathBuf, String)> = Vec::new();
        let mut has_weights = false;
        for p in paths {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                self.fail(&p, FenceError::NotUtf8);
                continue;
            };
            let weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
            let wanted = weights || name == "config.json" || name == "tokenizer_config.json";
            if !wanted {
                continue;
            }
            has_weights |= weights;
            match stamp(self.fence, &p) {
                Ok(st) => {
                    self.out.files_seen += 1;
                    files.push(st);
                }
                Err(e) if e.is_not_found() => {}
                // Optional: reported, not read, and the model stands without it.
                Err(e) if name == "tokenizer_config.json" => self.fail(&p, e),
                Err(e) => refused.push((p, e.to_string())),
            }
        }
        if has_weights {
            self.out.candidates.push(Candidate::Safetensors {
                root: root.to_path_buf(),
                dir: dir.to_path_buf(),
                files,
                refused,
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
