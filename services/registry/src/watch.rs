//! The filesystem watch: inotify (via `notify`) on every root, recursively; after a quiet period
//! (debounce) an incremental rescan picks up added, changed and removed files. Because rescans
//! compare (path, size, mtime), a burst of events costs one cheap walk.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::catalog::Catalog;

/// Keeps the watcher alive; dropping it stops watching.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
}

/// Watch `roots` and rescan after `debounce` of quiet following any change.
pub fn start(
    catalog: Catalog,
    roots: Vec<PathBuf>,
    debounce: Duration,
) -> notify::Result<WatchGuard> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    // Directory links are not followed: the walk never enters them, and watching through them
    // would put watches outside the roots (and around link loops).
    let mut watcher = notify::RecommendedWatcher::new(
        move |res: notify::Result<notify::Event>| {
            if let Ok(e) = res
                && !matches!(e.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(());
            }
        },
        notify::Config::default().with_follow_symlinks(false),
    )?;
    for r in &roots {
        if let Err(e) = watcher.watch(r, RecursiveMode::Recursive) {
            tracing::warn!("cannot watch {}: {e}", r.display());
        }
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until no event arrived for `debounce`.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            match catalog.rescan(Vec::new(), false, None).await {
                Ok(p) if p.added + p.changed + p.removed > 0 => tracing::info!(
                    added = p.added,
                    changed = p.changed,
                    removed = p.removed,
                    "watch: model set changed"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("watch rescan failed: {e}"),
            }
        }
    });
    Ok(WatchGuard { _watcher: watcher })
}
