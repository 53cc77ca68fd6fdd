//! Group commit: many committers share one WAL fsync.
//!
//! Each committer writes its WriteBatch to RocksDB without sync, takes a ticket
//! (a counter bumped after the write returned), and waits until some fsync that
//! *started after its write completed* has finished. The first waiter that finds
//! no fsync in progress becomes the leader: it notes the highest ticket issued so
//! far, syncs the WAL (`FlushWAL(sync=true)`, which syncs every live WAL file),
//! then publishes that ticket as synced and wakes everyone. Waiters whose ticket
//! is covered return; the rest elect the next leader. While one fsync runs, the
//! next group gathers, so throughput grows with the number of committers and a
//! lone committer pays exactly one write and one fsync.
//!
//! A failed fsync is fatal: it is recorded, every current and future waiter gets
//! the error, and no later sync is attempted (the WAL's state is unknown).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Coordinates WAL fsyncs between concurrent committers.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    /// Tickets issued: one per write that completed.
    written: AtomicU64,
    state: Mutex<SyncState>,
    synced_cv: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Every ticket up to this one is covered by a finished fsync.
    synced: u64,
    /// An fsync is in progress.
    leader_active: bool,
    /// The fsync failure that stopped group commit, if any.
    failed: Option<String>,
    /// Number of fsyncs performed (for stats).
    syncs: u64,
}

impl GroupCommit {
    /// Records that a write completed; returns its ticket.
    pub(crate) fn ticket(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Number of WAL fsyncs performed so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Blocks until `ticket` is covered by a finished fsync, running `sync`
    /// as the leader when needed. Returns the fsync error if one occurred.
    pub(crate) fn wait_durable<F>(&self, ticket: u64, sync: F) -> Result<(), String>
    where
        F: Fn() -> Result<(), String>,
    {
        let mut state = self.lock();
        loop {
            if let Some(err) = &state.failed {
                return Err(err.clone());
            }
            if state.synced >= ticket {
                return Ok(());
            }
            if state.leader_active {
                state = self
                    .synced_cv
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.leader_active = true;
            let target = self.written.load(Ordering::SeqCst);
            drop(state);
            let result = sync();
            state = self.lock();
            state.leader_active = false;
            state.syncs += 1;
            match result {
                Ok(()) => state.synced = state.synced.max(target),
                Err(e) => state.failed = Some(e),
            }
            self.synced_cv.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_committers_share_fsyncs() {
        let group = Arc::new(GroupCommit::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let group = Arc::clone(&group);
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let t = group.ticket();
                        group
                            .wait_durable(t, || {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                                Ok(())
                            })
                            .expect("sync ok");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let syncs = group.syncs();
        assert!(syncs >= 1);
        assert!(syncs < 400, "400 commits took {syncs} fsyncs: no grouping");
    }

    #[test]
    fn a_failed_sync_fails_every_later_waiter() {
        let group = GroupCommit::default();
        let t = group.ticket();
        assert_eq!(
            group.wait_durable(t, || Err("disk gone".into())),
            Err("disk gone".to_string())
        );
        let t2 = group.ticket();
        assert_eq!(
            group.wait_durable(t2, || Ok(())),
            Err("disk gone".to_string())
        );
    }
}
