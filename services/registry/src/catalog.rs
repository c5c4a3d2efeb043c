//! The catalogue actor: one task owns the model set (in memory, mirrored in SQLite); the cloneable
//! [`Catalog`] handle is the API.
//!
//! Scans run outside the actor (a scanner task, one at a time behind a lock): it asks the actor
//! for the current fingerprints, walks and parses in a blocking thread (only what changed), and
//! hands the diff back; the actor writes it to SQLite in one transaction, updates memory and
//! announces added / changed / removed models. Queries never wait for a scan.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use securellm_common::time::now_ms;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument;

use crate::discover;
use crate::estimate::{self, Breakdown, CacheType, EstimateInput, EstimateParams};
use crate::fence::Fence;
use crate::record::{self, Format, ModelRecord, Status};
use crate::store::{Measurement, MeasurementKey, Store, StoreError};

/// Errors the registry API returns; mapped to gRPC codes at the edge.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    #[error("the registry is shutting down")]
    Stopped,
}

impl RegistryError {
    /// A short, closed name of the error's kind (`error.type` on spans).
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::InvalidArgument { .. } => "invalid_argument",
            RegistryError::NotFound(_) => "not_found",
            RegistryError::FailedPrecondition(_) => "failed_precondition",
            RegistryError::Internal(_) => "internal",
            RegistryError::Stopped => "unavailable",
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError::Internal(e.to_string())
    }
}

/// What happened to a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Changed,
    Removed,
}

#[derive(Clone, Debug)]
pub struct ModelChange {
    pub kind: ChangeKind,
    pub model: ModelRecord,
    pub at_ms: u64,
}

/// Filters of `ListModels`.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub format: Option<Format>,
    pub architecture: Option<String>,
    pub name_contains: Option<String>,
    pub status: Option<Status>,
}

/// Scan progress (also the final counts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanProgress {
    pub files_seen: u64,
    pub files_parsed: u64,
    pub files_unchanged: u64,
    pub files_failed: u64,
    pub files_total: Option<u64>,
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
    pub current: String,
    pub failures: Vec<(String, String)>,
    pub elapsed_ms: u64,
    pub done: bool,
}

/// An estimate and where it came from.
#[derive(Clone, Debug)]
pub struct EstimateAnswer {
    pub model_id: String,
    pub input: EstimateInput,
    pub terms: Breakdown,
    pub measured_ms: Option<u64>,
}

type Reply<T> = oneshot::Sender<Result<T, RegistryError>>;

enum Msg {
    List(ListFilter, oneshot::Sender<Vec<ModelRecord>>),
    Get(String, Reply<ModelRecord>),
    Fingerprints(oneshot::Sender<HashMap<String, (String, ModelRecord)>>),
    Apply {
        upserts: Vec<ModelRecord>,
        removals: Vec<String>,
        reply: Reply<(u64, u64, u64)>,
    },
    Estimate(String, EstimateInput, Reply<EstimateAnswer>),
    Record {
        model: String,
        input: EstimateInput,
        measured: Breakdown,
        source: String,
        reply: Reply<(EstimateAnswer, bool)>,
    },
}

/// The registry's API.
#[derive(Clone)]
pub struct Catalog {
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<ModelChange>,
    scan_lock: Arc<tokio::sync::Mutex<()>>,
    roots: Arc<Vec<PathBuf>>,
}

/// Start the actor over the models stored in `store`.
pub async fn spawn(
    store: Store,
    roots: Vec<PathBuf>,
    aliases: BTreeMap<String, String>,
    params: EstimateParams,
) -> Result<Catalog, RegistryError> {
    let models: BTreeMap<String, ModelRecord> = store
        .load_models()
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let (tx, rx) = mpsc::channel(256);
    let (events, _) = broadcast::channel(1024);
    let actor = Actor {
        models,
        aliases,
        store,
        params,
        events: events.clone(),
        roots: roots.clone(),
    };
    tokio::spawn(actor.run(rx));
    Ok(Catalog {
        tx,
        events,
        scan_lock: Arc::new(tokio::sync::Mutex::new(())),
        roots: Arc::new(roots),
    })
}

impl Catalog {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, RegistryError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| RegistryError::Stopped)?;
        rx.await.map_err(|_| RegistryError::Stopped)
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    pub async fn list(&self, f: ListFilter) -> Result<Vec<ModelRecord>, RegistryError> {
        self.ask(|r| Msg::List(f, r)).await
    }

    pub async fn get(&self, reference: &str) -> Result<ModelRecord, RegistryError> {
        self.ask(|r| Msg::Get(reference.to_string(), r)).await?
    }

    pub async fn estimate(
        &self,
        model: &str,
        input: EstimateInput,
    ) -> Result<EstimateAnswer, RegistryError> {
        self.ask(|r| Msg::Estimate(model.to_string(), input, r))
            .await?
    }

    pub async fn record_measurement(
        &self,
        model: &str,
        input: EstimateInput,
        measured: Breakdown,
        source: String,
    ) -> Result<(EstimateAnswer, bool), RegistryError> {
        self.ask(|reply| Msg::Record {
            model: model.to_string(),
            input,
            measured,
            source,
            reply,
        })
        .await?
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ModelChange> {
        self.events.subscribe()
    }

    /// Scan `roots` (all configured roots when empty). Progress goes to `progress` (at most ~10
    /// messages a second plus one per failure); returns the final counts. Scans are serialised.
    pub async fn rescan(
        &self,
        roots: Vec<PathBuf>,
        full: bool,
        progress: Option<mpsc::Sender<ScanProgress>>,
    ) -> Result<ScanProgress, RegistryError> {
        for r in &roots {
            if !self.roots.iter().any(|c| c == r) {
                return Err(RegistryError::InvalidArgument {
                    field: "roots",
                    message: format!("{} is not a configured model root", r.display()),
                });
            }
        }
        let roots = if roots.is_empty() {
            self.roots.to_vec()
        } else {
            roots
        };
        let span = tracing::info_span!(
            "registry.scan",
            otel.name = "registry.scan",
            registry.scan.roots = roots.len(),
            registry.scan.full = full,
            registry.scan.models_found = tracing::field::Empty,
            registry.scan.files_parsed = tracing::field::Empty,
            registry.scan.files_failed = tracing::field::Empty,
            registry.scan.duration_ms = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let r = self
            .scan_under_lock(roots, full, progress)
            .instrument(span.clone())
            .await;
        match &r {
            Ok((counts, found)) => {
                span.record("registry.scan.models_found", found);
                span.record("registry.scan.files_parsed", counts.files_parsed);
                span.record("registry.scan.files_failed", counts.files_failed);
                span.record("registry.scan.duration_ms", counts.elapsed_ms);
            }
            Err(e) => {
                span.record("error.type", e.kind());
            }
        }
        r.map(|(counts, _)| counts)
    }

    /// [`Self::rescan`] once the roots are checked: the counts and how many models were found.
    async fn scan_under_lock(
        &self,
        roots: Vec<PathBuf>,
        full: bool,
        progress: Option<mpsc::Sender<ScanProgress>>,
    ) -> Result<(ScanProgress, u64), RegistryError> {
        let _guard = self.scan_lock.lock().await;
        let started = Instant::now();
        let known = self.ask(Msg::Fingerprints).await?;
        let (ptx, mut prx) = mpsc::unbounded_channel::<ScanProgress>();
        let scan_roots = roots.clone();
        let all_roots = self.roots.clone();
        let work = tokio::task::spawn_blocking(move || {
            let fence = Fence::new(&all_roots);
            scan(&scan_roots, &fence, &known, full, started, &ptx)
        });
        // Forward progress, throttled.
        let mut last_sent = Instant::now() - Duration::from_secs(1);
        while let Some(p) = prx.recv().await {
            if let Some(tx) = &progress
                && (!p.failures.is_empty() || last_sent.elapsed() >= Duration::from_millis(100))
            {
                last_sent = Instant::now();
                let _ = tx.send(p).await;
            }
        }
        let (mut counts, upserts, removals, found) = work
            .await
            .map_err(|e| RegistryError::Internal(format!("scan task failed: {e}")))?;
        let (added, changed, removed) = self
            .ask(|reply| Msg::Apply {
                upserts,
                removals,
                reply,
            })
            .await??;
        counts.added = added;
        counts.changed = changed;
        counts.removed = removed;
        counts.current.clear();
        counts.failures.clear();
        let elapsed = started.elapsed();
        counts.elapsed_ms = elapsed.as_millis() as u64;
        counts.done = true;
        crate::metrics::scan_done(elapsed);
        if let Some(tx) = &progress {
            let _ = tx.send(counts.clone()).await;
        }
        Ok((counts, found))
    }
}

/// The blocking part of a scan: walk, compare fingerprints, parse what changed. Returns the
/// counts, the records to write, the ids to remove and how many models the roots hold.
fn scan(
    roots: &[PathBuf],
    fence: &Fence,
    known: &HashMap<String, (String, ModelRecord)>,
    full: bool,
    started: Instant,
    progress: &mpsc::UnboundedSender<ScanProgress>,
) -> (ScanProgress, Vec<ModelRecord>, Vec<String>, u64) {
    let found = discover::discover(roots, fence);
    let mut p = ScanProgress {
        files_seen: found.files_seen,
        files_failed: found.failures.len() as u64,
        files_total: Some(found.files_seen),
        failures: found
            .failures
            .iter()
            .map(|(path, why)| (path.display().to_string(), why.clone()))
            .collect(),
        ..ScanProgress::default()
    };
    let _ = progress.send(p.clone());
    p.failures.clear();
    let now = now_ms();
    let mut upserts = Vec::new();
    let mut seen_ids = std::collections::HashSet::new();
    let by_fingerprint: HashMap<&str, &ModelRecord> =
        known.values().map(|(fp, m)| (fp.as_str(), m)).collect();
    // Which known model each candidate would be: same id (derived from location).
    for c in &found.candidates {
        let fp = record::fingerprint(c);
        let stamps = c.stamps().len() as u64;
        // Cheap id: build() computes it from location; avoid parsing when the fingerprint matches.
        let existing = by_fingerprint.get(fp.as_str()).copied();
        if let (false, Some(m)) = (full, existing) {
            seen_ids.insert(m.id.clone());
            p.files_unchanged += stamps;
            continue;
        }
        p.current = c
            .stamps()
            .first()
            .map(|s| s.path.display().to_string())
            .unwrap_or_default();
        let mut r = record::build(c, fence, now);
        p.files_parsed += stamps;
        // A record that cannot be stored (a path that is not UTF-8 cannot go to JSON) is reported
        // and left out; it must never fail the scan's one transaction for every other model.
        if let Err(e) = serde_json::to_string(&r) {
            tracing::warn!("scan: {} cannot be stored ({e}); skipped", r.path.display());
            p.files_failed += 1;
            p.failures.push((
                r.path.display().to_string(),
                format!("cannot be stored: {e}"),
            ));
            let _ = progress.send(p.clone());
            p.failures.clear();
            continue;
        }
        if r.status == Status::Error {
            crate::metrics::parse_failure(r.format);
            p.files_failed += 1;
            p.failures
                .push((r.path.display().to_string(), r.status_reason.clone()));
        }
        if let Some((_, old)) = known.get(&r.id) {
            r.first_seen_ms = old.first_seen_ms;
        }
        seen_ids.insert(r.id.clone());
        upserts.push(r);
        p.elapsed_ms = started.elapsed().as_millis() as u64;
        let _ = progress.send(p.clone());
        p.failures.clear();
    }
    // Records hold canonical roots; compare with the scanned roots canonicalized too.
    let canonical: Vec<PathBuf> = roots
        .iter()
        .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
        .collect();
    let scanned_root = |m: &ModelRecord| {
        roots
            .iter()
            .chain(&canonical)
            .any(|r| m.root.starts_with(r))
    };
    let removals: Vec<String> = known
        .iter()
        .filter(|(id, (_, m))| !seen_ids.contains(*id) && scanned_root(m))
        .map(|(id, _)| id.clone())
        .collect();
    let models_found = seen_ids.len() as u64;
    (p, upserts, removals, models_found)
}

struct Actor {
    models: BTreeMap<String, ModelRecord>,
    aliases: BTreeMap<String, String>,
    store: Store,
    params: EstimateParams,
    events: broadcast::Sender<ModelChange>,
    roots: Vec<PathBuf>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::List(f, reply) => {
                    let _ = reply.send(self.list(&f));
                }
                Msg::Get(r, reply) => {
                    let _ = reply.send(self.resolve(&r).map(|m| self.with_aliases(m)));
                }
                Msg::Fingerprints(reply) => {
                    let map = self
                        .models
                        .iter()
                        .map(|(id, m)| (id.clone(), (m.fingerprint.clone(), m.clone())))
                        .collect();
                    let _ = reply.send(map);
                }
                Msg::Apply {
                    upserts,
                    removals,
                    reply,
                } => {
                    let _ = reply.send(self.apply(upserts, removals).await);
                }
                Msg::Estimate(model, input, reply) => {
                    let _ = reply.send(self.estimate(&model, input).await);
                }
                Msg::Record {
                    model,
                    input,
                    measured,
                    source,
                    reply,
                } => {
                    let _ = reply.send(self.record(&model, input, measured, source).await);
                }
            }
        }
        self.store.close().await;
    }

    fn with_aliases(&self, mut m: ModelRecord) -> ModelRecord {
        m.aliases = self.aliases_of(&m);
        m
    }

    /// Aliases pointing at model `m`.
    pub fn aliases_of(&self, m: &ModelRecord) -> Vec<String> {
        self.aliases
            .iter()
            .filter(|(_, target)| self.target_matches(target, m))
            .map(|(a, _)| a.clone())
            .collect()
    }

    fn target_matches(&self, target: &str, m: &ModelRecord) -> bool {
        if target == m.id || target == m.name {
            return true;
        }
        let p = Path::new(target);
        if p.is_absolute() {
            return m.path == p || m.files.iter().any(|f| f.path == p);
        }
        self.roots.iter().any(|r| {
            let full = r.join(p);
            m.path == full || m.files.iter().any(|f| f.path == full)
        })
    }

    fn list(&self, f: &ListFilter) -> Vec<ModelRecord> {
        let needle = f.name_contains.as_ref().map(|s| s.to_lowercase());
        let mut out: Vec<ModelRecord> = self
            .models
            .values()
            .filter(|m| f.format.is_none_or(|x| x == m.format))
            .filter(|m| f.status.is_none_or(|x| x == m.status))
            .filter(|m| {
                f.architecture.as_ref().is_none_or(|a| {
                    m.meta
                        .architecture
                        .as_ref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(a))
                })
            })
            .filter(|m| {
                needle.as_ref().is_none_or(|n| {
                    m.name.to_lowercase().contains(n)
                        || self
                            .aliases_of(m)
                            .iter()
                            .any(|a| a.to_lowercase().contains(n))
                })
            })
            .map(|m| self.with_aliases(m.clone()))
            .collect();
        out.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        out
    }

    fn resolve(&self, reference: &str) -> Result<ModelRecord, RegistryError> {
        if reference.trim().is_empty() {
            return Err(RegistryError::InvalidArgument {
                field: "model",
                message: "must not be empty".into(),
            });
        }
        if let Some(m) = self.models.get(reference) {
            return Ok(m.clone());
        }
        if let Some(target) = self.aliases.get(reference) {
            let hits: Vec<&ModelRecord> = self
                .models
                .values()
                .filter(|m| self.target_matches(target, m))
                .collect();
            return match hits.as_slice() {
                [m] => Ok((*m).clone()),
                [] => Err(RegistryError::NotFound(format!(
                    "alias {reference:?} points at {target:?}, which is not a known model"
                ))),
                many => Err(RegistryError::FailedPrecondition(format!(
                    "alias {reference:?} matches several models: {}",
                    many.iter()
                        .map(|m| m.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            };
        }
        let hits: Vec<&ModelRecord> = self
            .models
            .values()
            .filter(|m| m.name == reference)
            .collect();
        match hits.as_slice() {
            [m] => Ok((*m).clone()),
            [] => Err(RegistryError::NotFound(format!(
                "no model with id, alias or name {reference:?}"
            ))),
            many => Err(RegistryError::FailedPrecondition(format!(
                "name {reference:?} is ambiguous; use an id: {}",
                many.iter()
                    .map(|m| m.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    async fn apply(
        &mut self,
        upserts: Vec<ModelRecord>,
        removals: Vec<String>,
    ) -> Result<(u64, u64, u64), RegistryError> {
        // Only real changes are written and announced.
        let upserts: Vec<ModelRecord> = upserts
            .into_iter()
            .filter(|m| {
                self.models.get(&m.id).is_none_or(|old| {
                    let mut a = old.clone();
                    a.parsed_at_ms = m.parsed_at_ms;
                    a.aliases.clone_from(&m.aliases);
                    a != *m
                })
            })
            .collect();
        self.store.apply(&upserts, &removals).await?;
        let now = now_ms();
        let (mut added, mut changed, mut removed) = (0, 0, 0);
        for m in upserts {
            let kind = if self.models.contains_key(&m.id) {
                changed += 1;
                ChangeKind::Changed
            } else {
                added += 1;
                ChangeKind::Added
            };
            self.models.insert(m.id.clone(), m.clone());
            let _ = self.events.send(ModelChange {
                kind,
                model: m,
                at_ms: now,
            });
        }
        for id in removals {
            if let Some(m) = self.models.remove(&id) {
                removed += 1;
                let _ = self.events.send(ModelChange {
                    kind: ChangeKind::Removed,
                    model: m,
                    at_ms: now,
                });
            }
        }
        Ok((added, changed, removed))
    }

    fn key(m: &ModelRecord, input: EstimateInput) -> MeasurementKey {
        let blocks = m.meta.block_count.unwrap_or(0);
        MeasurementKey {
            context: input.context,
            parallel: input.parallel,
            cache: input.cache,
            gpu_layers: input.gpu_layers.unwrap_or(blocks + 1).min(blocks + 1),
        }
    }

    fn ready(m: &ModelRecord) -> Result<(), RegistryError> {
        if m.status != Status::Ok {
            return Err(RegistryError::FailedPrecondition(format!(
                "model {} is {:?}: {}",
                m.id, m.status, m.status_reason
            )));
        }
        Ok(())
    }

    async fn estimate(
        &self,
        reference: &str,
        input: EstimateInput,
    ) -> Result<EstimateAnswer, RegistryError> {
        let m = self.resolve(reference)?;
        Self::ready(&m)?;
        let computed = estimate::estimate(&m.meta, input, self.params).map_err(|e| match e {
            estimate::EstimateError::Invalid { field, message } => {
                RegistryError::InvalidArgument { field, message }
            }
            e @ estimate::EstimateError::Missing(_) => {
                RegistryError::FailedPrecondition(e.to_string())
            }
        })?;
        let measured = self.store.measurement(&m.id, Self::key(&m, input)).await?;
        Ok(EstimateAnswer {
            model_id: m.id,
            input,
            terms: measured.as_ref().map_or(computed, |x| x.terms),
            measured_ms: measured.map(|x| x.measured_ms),
        })
    }

    async fn record(
        &self,
        reference: &str,
        input: EstimateInput,
        measured: Breakdown,
        source: String,
    ) -> Result<(EstimateAnswer, bool), RegistryError> {
        let m = self.resolve(reference)?;
        Self::ready(&m)?;
        // Validates the configuration the same way Estimate does.
        estimate::estimate(&m.meta, input, self.params).map_err(|e| match e {
            estimate::EstimateError::Invalid { field, message } => {
                RegistryError::InvalidArgument { field, message }
            }
            e @ estimate::EstimateError::Missing(_) => {
                RegistryError::FailedPrecondition(e.to_string())
            }
        })?;
        let at = now_ms();
        let replaced = self
            .store
            .put_measurement(
                &m.id,
                Self::key(&m, input),
                &Measurement {
                    terms: measured,
                    source,
                    measured_ms: at,
                },
            )
            .await?;
        Ok((
            EstimateAnswer {
                model_id: m.id,
                input,
                terms: measured,
                measured_ms: Some(at),
            },
            replaced,
        ))
    }
}

/// Parse a cache type name (`f16`, `q8_0`, `q4_0`).
pub fn parse_cache_type(s: &str) -> Option<CacheType> {
    match s.to_ascii_lowercase().as_str() {
        "f16" => Some(CacheType::F16),
        "q8_0" => Some(CacheType::Q8_0),
        "q4_0" => Some(CacheType::Q4_0),
        _ => None,
    }
}
