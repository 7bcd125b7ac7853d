//! Which process runs a partition's stateful stage (a log writer, a detector): the one
//! holding the lock file of the partition's state directory.
//!
//! ```text
//! every second, for each partition p not run here:
//!   DIR/<p>/LOCK held by another process? ──yes──▶ skip (and forget when it was free)
//!        │ no
//!        ▼
//!   p preferred here, or free for TAKEOVER_AFTER? ──no──▶ wait
//!        │ yes
//!        ▼
//!   take the lock, open p's state, run it (the kernel releases the lock if we die)
//! ```
//!
//! The directories must be on a file system every contending process reaches, with
//! working `flock` (one machine, or a shared volume). Consumer-group rebalancing is not
//! used: the lock, not the broker's group coordinator, says who owns a partition.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a partition outside this process's preferred ones must be without an owner
/// before this process takes it: its preferred owner may be restarting.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(5);

/// One process's view of which partitions it may take now.
#[derive(Debug, Default)]
pub struct Claims {
    /// Taken at once when free; all when empty.
    preferred: Vec<u32>,
    free_since: BTreeMap<u32, Instant>,
}

impl Claims {
    pub fn new(preferred: Vec<u32>) -> Self {
        Self {
            preferred,
            free_since: BTreeMap::new(),
        }
    }

    /// Whether to try to take `partition` (whose state is in `dir`) now: nobody holds
    /// its lock, and it is preferred here or has been free for [`TAKEOVER_AFTER`].
    pub fn ready(&mut self, partition: u32, dir: &Path) -> bool {
        if held_elsewhere(dir) {
            self.free_since.remove(&partition);
            return false;
        }
        let since = *self.free_since.entry(partition).or_insert_with(Instant::now);
        self.preferred.is_empty() || self.preferred.contains(&partition) || since.elapsed() >= TAKEOVER_AFTER
    }

    /// `partition` is run here now.
    pub fn taken(&mut self, partition: u32) {
        self.free_since.remove(&partition);
    }
}

/// Whether another process holds `dir/LOCK`.
pub fn held_elsewhere(dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(dir.join("LOCK")) else {
        return false;
    };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// Takes `dir/LOCK` (creating `dir`); `None` when another process holds it. The lock
/// lasts as long as the file is open.
pub fn try_lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preferred_partition_is_taken_at_once_another_only_after_the_takeover_delay() {
        let dir = tempfile::tempdir().unwrap();
        let mut claims = Claims::new(vec![0]);
        assert!(claims.ready(0, &dir.path().join("0")));
        assert!(!claims.ready(1, &dir.path().join("1")), "not preferred: wait");
        // A lock held through another open file description counts as held elsewhere.
        let held = try_lock(&dir.path().join("0")).unwrap().expect("free");
        assert!(held_elsewhere(&dir.path().join("0")));
        assert!(!claims.ready(0, &dir.path().join("0")));
        assert!(try_lock(&dir.path().join("0")).unwrap().is_none());
        drop(held);
        assert!(!held_elsewhere(&dir.path().join("0")));
        assert!(try_lock(&dir.path().join("0")).unwrap().is_some());
    }
}
