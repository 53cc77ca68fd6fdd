//! Writes waiting until other regions hold them (`min_regions`, named
//! regions), checked whenever the core's progress for their document
//! changed.

use super::*;

impl Driver {
    /// Registers a write waiting for other regions, answering at once if it
    /// is already satisfied.
    pub(super) fn await_regions(&mut self, waiter: RegionWaiter) {
        if self.waiters.len() >= MAX_REGION_WAITERS {
            self.waiters.retain(|w| !w.reply.is_closed());
        }
        if self.waiters.len() >= MAX_REGION_WAITERS {
            let _ = waiter.reply.send(Err(NodeError::Busy(format!(
                "{MAX_REGION_WAITERS} writes are already waiting for other regions"
            ))));
            return;
        }
        self.waiters.push(waiter);
        let last = self.waiters.len() - 1;
        self.check_waiter(last);
    }

    /// Answers the waiting writes whose documents' progress changed.
    pub(super) fn check_waiters(&mut self) {
        let (touched, overflow) = self.core.take_touched();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            if w.reply.is_closed() {
                self.waiters.swap_remove(i);
                continue;
            }
            if (overflow || touched.contains(&w.doc)) && self.check_waiter(i) {
                continue;
            }
            i += 1;
        }
    }

    /// Answers waiter `i` and removes it if its regions hold the write.
    pub(super) fn check_waiter(&mut self, i: usize) -> bool {
        let w = &self.waiters[i];
        let regions = match self.regions_holding(&w.doc, &w.heads) {
            Ok(r) => r,
            Err(e) => {
                let w = self.waiters.swap_remove(i);
                let _ = w.reply.send(Err(NodeError::Engine(e)));
                return true;
            }
        };
        if !w.need.satisfied_by(&regions) {
            return false;
        }
        let w = self.waiters.swap_remove(i);
        let _ = w.reply.send(Ok(regions.into_iter().collect()));
        true
    }

    /// Regions other than this node's known to hold `heads` of `doc`.
    pub(super) fn regions_holding(
        &self,
        doc: &DocId,
        heads: &[ChangeHash],
    ) -> Result<BTreeSet<String>, causeway_engine::Error> {
        let own = &self.config.region;
        Ok(self
            .core
            .holders(doc, heads)?
            .into_iter()
            .filter(|h| h.holds)
            .filter_map(|h| h.region)
            .filter(|r| r != own)
            .map(|r| r.to_string())
            .collect())
    }
}
