//! Which stretch of the older image to compress a new image's missing bytes against.
//!
//! The chunks a new image lacks are mostly changed versions of chunks nearby in the older
//! one: a file grown by a few bytes, a table with new entries. Compressed with zstd against
//! the older image's bytes around where they sit (a reference that both ends hold: Central
//! Command stores the older release, the appliance runs it), they shrink to about what a
//! binary patch for the exact pair takes (docs/delta.md). [`SharedRuns`] remembers where the
//! new image's shared chunks sit in the older image; [`SharedRuns::reference`] picks, for a
//! stretch of the new image, the older image's bytes around it.
//!
//! Nothing here is trusted: bytes decompressed against a reference are checked against the
//! new image's root like any others, so a damaged active slot or a wrong reference costs a
//! fetch, never a wrong byte.

use std::ops::Range;

/// How far the reference reaches past the shared chunks on either side of a stretch: enough
/// for a file that moved a little or grew.
pub const MARGIN: u64 = 1 << 20;
/// The longest reference. With a piece (at most 1 MiB) it fits the 8 MiB window that an
/// appliance decodes with; it is also what each end holds in memory for a request.
pub const MAX_REFERENCE: u64 = 6 << 20;

/// A stretch of the new image that the older image holds too: `len` bytes at `new` in the
/// new image, at `old` in the older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    new: u64,
    old: u64,
    len: u64,
}

/// Where the new image's shared chunks sit in the older image, as runs contiguous in both,
/// in the new image's order. At most [`MAX_RUNS`] are kept (24 bytes each): beyond them the
/// new image shares little in long stretches, and what follows gets no reference.
#[derive(Debug, Clone, Default)]
pub struct SharedRuns {
    runs: Vec<Run>,
    older_len: u64,
}

pub const MAX_RUNS: usize = 1 << 18;

impl SharedRuns {
    /// Runs over an older image of `older_len` bytes.
    pub fn new(older_len: u64) -> Self {
        Self { runs: Vec::new(), older_len }
    }

    /// The next shared chunk of the new image (in order): `len` bytes at `new`, found at
    /// `old` in the older image.
    pub fn push(&mut self, new: u64, old: u64, len: u64) {
        if let Some(last) = self.runs.last_mut() {
            debug_assert!(last.new + last.len <= new, "chunks in order");
            if last.new + last.len == new && last.old + last.len == old {
                last.len += len;
                return;
            }
        }
        if self.runs.len() < MAX_RUNS && old + len <= self.older_len {
            self.runs.push(Run { new, old, len });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// The older image's bytes to compress `stretch` of the new image against: from
    /// [`MARGIN`] before where the shared bytes just before the stretch sit (or, with none
    /// before, the first shared bytes inside it), to [`MARGIN`] past where the first shared
    /// bytes after it sit; at most [`MAX_REFERENCE`], kept from its start (or, with nothing
    /// shared before, from its end). `None` when the images share nothing.
    pub fn reference(&self, stretch: Range<u64>) -> Option<Range<u64>> {
        // The first run that ends after the stretch starts.
        let next = self.runs.partition_point(|r| r.new + r.len <= stretch.start);
        let before = match next.checked_sub(1).map(|i| self.runs[i]) {
            // Where the older image's copy of the bytes just before the stretch ends.
            Some(run) => Some(run.old + run.len),
            None => self
                .runs
                .get(next)
                .filter(|run| run.new < stretch.end)
                .map(|run| run.old + stretch.start.saturating_sub(run.new)),
        };
        // The first run that ends past the stretch: where its bytes past the stretch sit.
        let from = self.runs[next..].partition_point(|r| r.new + r.len <= stretch.end);
        let after =
            self.runs.get(next + from).map(|run| run.old + stretch.end.saturating_sub(run.new));
        let (first, last) = match (before, after) {
            (None, None) => return None,
            (first, last) => (first.or(last)?, last.or(first)?),
        };
        let lo = first.min(last).saturating_sub(MARGIN);
        let hi = (first.max(last) + MARGIN).min(self.older_len);
        let (lo, hi) = match (hi - lo.min(hi) > MAX_REFERENCE, before) {
            (false, _) => (lo.min(hi), hi),
            (true, Some(first)) => {
                let lo = first.saturating_sub(MARGIN).min(hi);
                (lo, (lo + MAX_REFERENCE).min(self.older_len))
            }
            (true, None) => (hi.saturating_sub(MAX_REFERENCE), hi),
        };
        (lo < hi).then_some(lo..hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn chunks_adjacent_in_both_images_make_one_run() {
        let mut runs = SharedRuns::new(100 * MIB);
        runs.push(0, 500, 100);
        runs.push(100, 600, 50);
        runs.push(150, 0, 10);
        runs.push(170, 10, 10);
        assert_eq!(runs.len(), 3);
    }

    #[test]
    fn the_reference_surrounds_where_the_stretch_sits_in_the_older_image() {
        let mut runs = SharedRuns::new(100 * MIB);
        // New 0..10 MiB is old 20..30 MiB; new 11..20 MiB is old 31..40 MiB (1 MiB changed).
        runs.push(0, 20 * MIB, 10 * MIB);
        runs.push(11 * MIB, 31 * MIB, 9 * MIB);
        assert_eq!(runs.reference(10 * MIB..11 * MIB), Some(29 * MIB..32 * MIB));
        // A stretch starting inside a run: the run's bytes up to it count as before.
        assert_eq!(runs.reference(5 * MIB..6 * MIB), Some(24 * MIB..27 * MIB));
    }

    #[test]
    fn a_reference_too_long_is_kept_from_the_bytes_before_the_stretch() {
        let mut runs = SharedRuns::new(100 * MIB);
        // The shared bytes after the stretch sit far away in the older image.
        runs.push(0, 50 * MIB, MIB);
        runs.push(2 * MIB, 5 * MIB, MIB);
        assert_eq!(runs.reference(MIB..2 * MIB), Some(50 * MIB..56 * MIB));
    }

    #[test]
    fn with_nothing_shared_before_the_reference_ends_past_the_bytes_after() {
        let mut runs = SharedRuns::new(100 * MIB);
        runs.push(3 * MIB, 40 * MIB, MIB);
        assert_eq!(runs.reference(0..MIB), Some(39 * MIB..41 * MIB));
        // Shared bytes inside the stretch count as before it.
        assert_eq!(runs.reference(2 * MIB + 5..4 * MIB + 5), Some(39 * MIB..41 * MIB));
    }

    #[test]
    fn the_reference_stays_within_the_older_image() {
        let mut runs = SharedRuns::new(10 * MIB);
        runs.push(0, 9 * MIB, MIB);
        assert_eq!(runs.reference(MIB..2 * MIB), Some(9 * MIB..10 * MIB));
        // A run said to lie past the older image's end is not kept.
        runs.push(5 * MIB, 10 * MIB, 1);
        assert_eq!(runs.len(), 1);
    }

    #[test]
    fn images_that_share_nothing_have_no_reference() {
        assert_eq!(SharedRuns::new(MIB).reference(0..MIB), None);
    }
}
