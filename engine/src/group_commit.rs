//! Group commit: many committers share one WAL fsync.
//!
//! A committer that must wait for durability hands its WriteBatch to the
//! group and waits once. The first waiter that finds no leader at work
//! becomes the leader: it takes every batch queued so far, writes them to
//! RocksDB one after the other without sync, syncs the WAL
//! (`FlushWAL(sync=true)`, which syncs every live WAL file), then marks the
//! whole group durable and wakes everyone. Waiters whose batch was in the
//! group return; the rest elect the next leader, whose group has gathered
//! while the fsync ran. So throughput grows with the number of committers, a
//! lone committer pays exactly one write and one fsync, and each committer
//! blocks once, not once in RocksDB's own write group and again here.
//!
//! Writes that do not wait ([`GroupCommit::written`] after writing directly)
//! take a ticket instead; [`GroupCommit::wait_durable`] waits until an fsync
//! that started after that write completed has finished.
//!
//! Batches are written in the order they were queued, so a batch queued
//! after another committer's returned is written after it, and the WAL's
//! order (a crash keeps a prefix of it) follows the committers' order.
//!
//! A failed write or fsync is fatal: it is recorded, every current and future
//! waiter gets the error, and no later write or sync is attempted (the WAL's
//! state is unknown).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Coordinates WAL writes and fsyncs between concurrent committers; `B` is
/// what one committer writes (a RocksDB WriteBatch in the store).
#[derive(Debug)]
pub(crate) struct GroupCommit<B> {
    /// Tickets issued: one per write that completed, queued or direct.
    written: AtomicU64,
    state: Mutex<SyncState<B>>,
    synced_cv: Condvar,
}

#[derive(Debug)]
struct SyncState<B> {
    /// Batches waiting for a leader, oldest first. Bounded by the number of
    /// committing threads: each batch belongs to a committer blocked in
    /// [`GroupCommit::commit`] until it is written.
    queue: VecDeque<B>,
    /// Number of batches ever queued.
    queued: u64,
    /// Every queued batch up to this number is written and synced.
    committed: u64,
    /// Every ticket up to this one is covered by a finished fsync.
    synced: u64,
    /// A leader is writing or syncing.
    leader_active: bool,
    /// The failure that stopped group commit, if any.
    failed: Option<String>,
    /// Number of fsyncs completed (for stats).
    syncs: u64,
}

impl<B> Default for GroupCommit<B> {
    fn default() -> Self {
        GroupCommit {
            written: AtomicU64::new(0),
            state: Mutex::new(SyncState {
                queue: VecDeque::new(),
                queued: 0,
                committed: 0,
                synced: 0,
                leader_active: false,
                failed: None,
                syncs: 0,
            }),
            synced_cv: Condvar::new(),
        }
    }
}

impl<B> GroupCommit<B> {
    /// Records that a write made directly (not through
    /// [`GroupCommit::commit`]) completed; returns its ticket.
    pub(crate) fn written(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Number of WAL fsyncs performed so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Queues `batch` and blocks until it is written and covered by a
    /// finished fsync, running `write` (for each batch of a group, in queue
    /// order) and then `sync` as the leader when needed. Returns the first
    /// write or fsync error if one occurred, now or before.
    pub(crate) fn commit<W, S>(&self, batch: B, write: W, sync: S) -> Result<(), String>
    where
        W: Fn(B) -> Result<(), String>,
        S: Fn() -> Result<(), String>,
    {
        let mut state = self.lock();
        if let Some(err) = &state.failed {
            return Err(err.clone());
        }
        state.queue.push_back(batch);
        state.queued += 1;
        let mine = state.queued;
        self.wait_for(state, |s| s.committed >= mine, &write, &sync)
    }

    /// Blocks until `ticket` is covered by a finished fsync, leading a group
    /// (writing what is queued, then syncing) when needed. Returns the first
    /// write or fsync error if one occurred, now or before.
    pub(crate) fn wait_durable<W, S>(&self, ticket: u64, write: W, sync: S) -> Result<(), String>
    where
        W: Fn(B) -> Result<(), String>,
        S: Fn() -> Result<(), String>,
    {
        let state = self.lock();
        self.wait_for(state, |s| s.synced >= ticket, &write, &sync)
    }

    fn wait_for<'a, W, S>(
        &'a self,
        mut state: MutexGuard<'a, SyncState<B>>,
        done: impl Fn(&SyncState<B>) -> bool,
        write: &W,
        sync: &S,
    ) -> Result<(), String>
    where
        W: Fn(B) -> Result<(), String>,
        S: Fn() -> Result<(), String>,
    {
        loop {
            if let Some(err) = &state.failed {
                return Err(err.clone());
            }
            if done(&state) {
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
            let group = std::mem::take(&mut state.queue);
            let last = state.queued;
            drop(state);
            let result = self.lead(group, write, sync);
            state = self.lock();
            state.leader_active = false;
            match result {
                Ok(target) => {
                    state.syncs += 1;
                    state.synced = state.synced.max(target);
                    state.committed = last;
                }
                Err(e) => state.failed = Some(e),
            }
            self.synced_cv.notify_all();
        }
    }

    /// Writes `group` in order, then syncs; returns the highest ticket the
    /// sync covers.
    fn lead<W, S>(&self, group: VecDeque<B>, write: &W, sync: &S) -> Result<u64, String>
    where
        W: Fn(B) -> Result<(), String>,
        S: Fn() -> Result<(), String>,
    {
        for batch in group {
            write(batch)?;
            self.written();
        }
        let target = self.written.load(Ordering::SeqCst);
        sync()?;
        Ok(target)
    }

    fn lock(&self) -> MutexGuard<'_, SyncState<B>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_committers_share_fsyncs_and_every_batch_is_written_once() {
        let group = Arc::new(GroupCommit::<u64>::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8_u64)
            .map(|t| {
                let (group, log) = (Arc::clone(&group), Arc::clone(&log));
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let write = |b| {
                            log.lock().expect("log").push(b);
                            Ok(())
                        };
                        let sync = || {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            Ok(())
                        };
                        group.commit(t * 1000 + i, write, sync).expect("commit");
                        // Returned only once written: the batch is in the log.
                        assert!(log.lock().expect("log").contains(&(t * 1000 + i)));
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
        let mut log = log.lock().expect("log").clone();
        // Each committer's batches were written in its own order.
        for t in 0..8_u64 {
            let mine: Vec<u64> = log.iter().copied().filter(|b| b / 1000 == t).collect();
            assert_eq!(mine, (0..50).map(|i| t * 1000 + i).collect::<Vec<_>>());
        }
        log.sort_unstable();
        log.dedup();
        assert_eq!(log.len(), 400, "a batch was lost or written twice");
    }

    #[test]
    fn a_failed_sync_fails_every_later_committer_without_writing() {
        let group = GroupCommit::<u64>::default();
        let written = Mutex::new(Vec::new());
        let write = |b| {
            written.lock().expect("written").push(b);
            Ok(())
        };
        assert_eq!(
            group.commit(1, write, || Err("disk gone".into())),
            Err("disk gone".to_string())
        );
        assert_eq!(
            group.commit(2, write, || Ok(())),
            Err("disk gone".to_string())
        );
        let t = group.written();
        assert_eq!(
            group.wait_durable(t, write, || Ok(())),
            Err("disk gone".to_string())
        );
        assert_eq!(*written.lock().expect("written"), vec![1]);
    }

    #[test]
    fn a_failed_write_fails_its_group_and_skips_the_sync() {
        let group = GroupCommit::<u64>::default();
        let synced = AtomicU64::new(0);
        let result = group.commit(
            7,
            |_| Err("no space".into()),
            || {
                synced.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        );
        assert_eq!(result, Err("no space".to_string()));
        assert_eq!(synced.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_direct_write_is_durable_after_an_fsync_that_started_after_it() {
        let group = GroupCommit::<u64>::default();
        let syncs = AtomicU64::new(0);
        let sync = || {
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let t = group.written();
        group.wait_durable(t, |_| Ok(()), sync).expect("durable");
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        // Already covered: no second fsync.
        group.wait_durable(t, |_| Ok(()), sync).expect("durable");
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        // A committed batch's fsync covers a direct write made before it.
        let t2 = group.written();
        group.commit(5, |_| Ok(()), sync).expect("commit");
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
        group.wait_durable(t2, |_| Ok(()), sync).expect("durable");
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
    }
}
