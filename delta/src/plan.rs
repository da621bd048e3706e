//! A plan for one pair of images: how to make the newer from the older, for an appliance
//! whose active slot holds exactly the older one.
//!
//! Central Command holds both releases, so it can work out from their two content indexes
//! where the newer image's shared bytes sit in the older one ([`Run`]s, contiguous in both),
//! and add the chaining value of every 16 KiB group the runs do not cover whole. That is all
//! an appliance on the older release needs: it hashes the groups it can copy itself, takes
//! the rest from the plan, and rebuilds the newer image's whole outboard from them. On a real
//! pair a plan is a tenth of the index and group hashes it replaces (docs/delta.md), and the
//! appliance no longer cuts its slot into chunks.
//!
//! Nothing in a plan is trusted on its own: the group hashes it yields are used only if the
//! whole tree they make hashes to the signed root, so a wrong run or a wrong hash costs the
//! plan (the agent falls back to the index and group hashes), never a wrong byte.
//!
//! Little-endian: the 8-byte magic `SCPLAN01`; the older image's BLAKE3 (32 bytes) and size
//! (u64); the newer image's size (u64); the number of runs (u32); then each run as three
//! LEB128 varints (the gap in the newer image since the previous run's end, the distance in
//! the older image from the previous run's end, zigzag-signed, and the length); then 32
//! bytes for each group of the newer image that the runs do not cover whole, in order; then
//! nothing.

use std::io::{self, BufReader, Read, Write};

use crate::GROUP_BYTES;
use crate::index::{IndexEntry, IndexError};
use crate::reuse::{GroupCopy, GroupPlanner, OlderImage, Span};

const MAGIC: &[u8; 8] = b"SCPLAN01";
const HEADER_BYTES: usize = 8 + 32 + 8 + 8 + 4;

/// The most runs a plan holds (24 bytes each in memory, 6 MiB): a pair that shares so little
/// in long stretches gets no plan, and updates with the index instead.
pub const MAX_RUNS: usize = crate::reference::MAX_RUNS;

/// `len` bytes at `new` in the newer image are at `old` in the older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub new: u64,
    pub old: u64,
    pub len: u64,
}

/// Which images a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanHeader {
    pub from_blake3: [u8; 32],
    pub from_size: u64,
    pub to_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("not a plan (no SCPLAN01 magic)")]
    NotAPlan,
    #[error("the plan is for an image of {found} bytes, not {expected}")]
    Size { expected: u64, found: u64 },
    #[error("the plan has {0} runs, more than {MAX_RUNS}")]
    TooManyRuns(u64),
    #[error("the plan names an older image of {0} bytes")]
    FromSize(u64),
    #[error("run {0} is empty, out of order or outside the images")]
    BadRun(usize),
    #[error("the plan's group hashes end early or run on")]
    Hashes,
    #[error("content index: {0}")]
    Index(#[from] IndexError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Where the newer image (its index, streamed; `size` bytes) shares bytes with the older one
/// (its chunks, from its index), as runs contiguous in both. `Ok(None)` when the pair shares
/// so little in long stretches that there are more than [`MAX_RUNS`].
pub fn runs_between(
    older: &OlderImage,
    newer: impl Iterator<Item = Result<IndexEntry, IndexError>>,
    size: u64,
) -> Result<Option<Vec<Run>>, IndexError> {
    let mut planner = GroupPlanner::new(older, size);
    let mut runs: Vec<Run> = Vec::new();
    for chunk in newer {
        for copy in planner.push(&chunk?) {
            for span in &copy.spans {
                let new = copy.group * GROUP_BYTES + u64::from(span.at);
                let len = u64::from(span.len);
                match runs.last_mut() {
                    Some(last)
                        if last.new + last.len == new && last.old + last.len == span.from =>
                    {
                        last.len += len
                    }
                    _ => runs.push(Run { new, old: span.from, len }),
                }
            }
            if runs.len() > MAX_RUNS {
                return Ok(None);
            }
        }
    }
    Ok(Some(runs))
}

/// Writes the plan with these `runs` (in order, as [`runs_between`] gives them), taking the
/// hashes of the groups they do not cover whole from `group_hash` (group index → chaining
/// value).
pub fn write(
    header: PlanHeader,
    runs: &[Run],
    mut group_hash: impl FnMut(u64) -> io::Result<[u8; 32]>,
    mut out: impl Write,
) -> Result<(), PlanError> {
    if runs.len() > MAX_RUNS {
        return Err(PlanError::TooManyRuns(runs.len() as u64));
    }
    if header.from_size > i64::MAX as u64 {
        return Err(PlanError::FromSize(header.from_size));
    }
    out.write_all(MAGIC)?;
    out.write_all(&header.from_blake3)?;
    out.write_all(&header.from_size.to_le_bytes())?;
    out.write_all(&header.to_size.to_le_bytes())?;
    out.write_all(&(runs.len() as u32).to_le_bytes())?;
    let (mut new_end, mut old_end) = (0u64, 0u64);
    for run in runs {
        write_varint(&mut out, run.new - new_end)?;
        write_varint(&mut out, zigzag(run.old as i64 - old_end as i64))?;
        write_varint(&mut out, run.len)?;
        (new_end, old_end) = (run.new + run.len, run.old + run.len);
    }
    for group in GroupCopies::new(runs, header.to_size).not_whole() {
        out.write_all(&group_hash(group)?)?;
    }
    out.flush()?;
    Ok(())
}

/// A plan being read: its header and runs (checked to lie in order inside both images), then
/// its group hashes, streamed.
#[derive(Debug)]
pub struct PlanReader<R> {
    pub header: PlanHeader,
    pub runs: Vec<Run>,
    reader: BufReader<R>,
    /// Hashes left to read.
    hashes_left: u64,
}

impl<R: Read> PlanReader<R> {
    /// Reads the header and runs of a plan for a newer image of `to_size` bytes.
    pub fn new(reader: R, to_size: u64) -> Result<Self, PlanError> {
        let mut reader = BufReader::with_capacity(64 * 1024, reader);
        let mut head = [0u8; HEADER_BYTES];
        match reader.read_exact(&mut head) {
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(PlanError::NotAPlan);
            }
            other => other?,
        }
        if &head[..8] != MAGIC {
            return Err(PlanError::NotAPlan);
        }
        let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8"));
        let header = PlanHeader {
            from_blake3: head[8..40].try_into().expect("32"),
            from_size: u64_at(40),
            to_size: u64_at(48),
        };
        if header.to_size != to_size {
            return Err(PlanError::Size { expected: to_size, found: header.to_size });
        }
        // Distances between runs are signed 64-bit numbers.
        if header.from_size > i64::MAX as u64 {
            return Err(PlanError::FromSize(header.from_size));
        }
        let count = u32::from_le_bytes(head[56..60].try_into().expect("4"));
        if count as usize > MAX_RUNS {
            return Err(PlanError::TooManyRuns(count.into()));
        }
        let mut runs = Vec::with_capacity(count as usize);
        let (mut new_end, mut old_end) = (0u64, 0u64);
        for at in 0..count as usize {
            let bad = || PlanError::BadRun(at);
            let new = new_end.checked_add(read_varint(&mut reader)?).ok_or_else(bad)?;
            let old = (old_end as i64).checked_add(unzigzag(read_varint(&mut reader)?));
            let old = old.and_then(|old| u64::try_from(old).ok()).ok_or_else(bad)?;
            let len = read_varint(&mut reader)?;
            let fits = |start: u64, size: u64| start.checked_add(len).is_some_and(|e| e <= size);
            if len == 0
                || (at > 0 && new == new_end && old == old_end)
                || !fits(new, header.to_size)
                || !fits(old, header.from_size)
            {
                return Err(bad());
            }
            runs.push(Run { new, old, len });
            (new_end, old_end) = (new + len, old + len);
        }
        let hashes_left = GroupCopies::new(&runs, to_size).not_whole().count() as u64;
        Ok(Self { header, runs, reader, hashes_left })
    }

    /// The next group hash, for the next group the runs do not cover whole.
    pub fn next_hash(&mut self) -> Result<[u8; 32], PlanError> {
        if self.hashes_left == 0 {
            return Err(PlanError::Hashes);
        }
        let mut hash = [0u8; 32];
        self.reader.read_exact(&mut hash).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => PlanError::Hashes,
            _ => PlanError::Io(e),
        })?;
        self.hashes_left -= 1;
        Ok(hash)
    }

    /// Checks that every group hash was read and nothing follows.
    pub fn finish(mut self) -> Result<(), PlanError> {
        match self.hashes_left == 0 && self.reader.read(&mut [0u8; 1])? == 0 {
            true => Ok(()),
            false => Err(PlanError::Hashes),
        }
    }

    /// What the older image holds of each group, from the runs.
    pub fn group_copies(&self) -> GroupCopies<'_> {
        GroupCopies::new(&self.runs, self.header.to_size)
    }
}

/// Each group of the newer image (`size` bytes) in order, with the parts of it that runs
/// place in the older image: a group the runs cover exactly is `whole`; a group they do not
/// touch has no spans.
#[derive(Debug, Clone)]
pub struct GroupCopies<'r> {
    runs: &'r [Run],
    size: u64,
    group: u64,
    /// The first run that may still reach into `group`.
    run: usize,
}

impl<'r> GroupCopies<'r> {
    pub fn new(runs: &'r [Run], size: u64) -> Self {
        Self { runs, size, group: 0, run: 0 }
    }

    /// The groups the runs do not cover whole, in order.
    pub fn not_whole(self) -> impl Iterator<Item = u64> + 'r {
        self.filter(|copy| !copy.whole).map(|copy| copy.group)
    }
}

impl Iterator for GroupCopies<'_> {
    type Item = GroupCopy;

    fn next(&mut self) -> Option<GroupCopy> {
        let start = self.group * GROUP_BYTES;
        if start >= self.size {
            return None;
        }
        let end = (start + GROUP_BYTES).min(self.size);
        while self.runs.get(self.run).is_some_and(|r| r.new + r.len <= start) {
            self.run += 1;
        }
        let mut spans = Vec::new();
        for run in self.runs[self.run..].iter().take_while(|r| r.new < end) {
            let from = run.new.max(start);
            let to = (run.new + run.len).min(end);
            spans.push(Span {
                at: (from - start) as u32,
                from: run.old + (from - run.new),
                len: (to - from) as u32,
            });
        }
        let covered: u64 = spans.iter().map(|s| u64::from(s.len)).sum();
        let copy = GroupCopy { group: self.group, spans, whole: covered == end - start };
        self.group += 1;
        Some(copy)
    }
}

fn write_varint(out: &mut impl Write, mut value: u64) -> io::Result<()> {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while value >= 0x80 {
        bytes[n] = (value as u8) | 0x80;
        value >>= 7;
        n += 1;
    }
    bytes[n] = value as u8;
    out.write_all(&bytes[..=n])
}

fn read_varint(reader: &mut impl Read) -> Result<u64, PlanError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte)?;
        // The tenth byte holds the 64th bit only.
        if shift == 63 && byte[0] > 1 {
            break;
        }
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(PlanError::Io(io::Error::new(io::ErrorKind::InvalidData, "varint longer than 64 bits")))
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Chunking, chunks};

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn entries(image: &[u8]) -> impl Iterator<Item = Result<IndexEntry, IndexError>> {
        let chunks = chunks(image, Chunking::default()).expect("chunks");
        chunks.into_iter().map(|c| Ok(IndexEntry::from(&c)))
    }

    /// The group hash a test plan carries: the group's index, so the test can tell which.
    fn marker(group: u64) -> io::Result<[u8; 32]> {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&group.to_le_bytes());
        Ok(hash)
    }

    fn plan_for(old: &[u8], new: &[u8]) -> Vec<u8> {
        let older = OlderImage::read(old, Chunking::default()).expect("older");
        let header = PlanHeader {
            from_blake3: *blake3::hash(old).as_bytes(),
            from_size: old.len() as u64,
            to_size: new.len() as u64,
        };
        let runs = runs_between(&older, entries(new), new.len() as u64).expect("runs");
        let mut plan = Vec::new();
        write(header, &runs.expect("few runs"), marker, &mut plan).expect("write");
        plan
    }

    /// Each group in order, with the parts of it runs place: a run that ends on a group's
    /// end, one across several groups, a gap, and a short last group.
    #[test]
    fn runs_are_cut_into_each_groups_parts() {
        let g = GROUP_BYTES;
        let runs = [
            Run { new: 0, old: 500, len: g },
            Run { new: g + 100, old: 10 * g, len: 2 * g },
            Run { new: 3 * g + 100, old: 0, len: 50 },
        ];
        let copies: Vec<GroupCopy> = GroupCopies::new(&runs, 3 * g + 150).collect();
        let span = |at: u64, from: u64, len: u64| Span { at: at as u32, from, len: len as u32 };
        let expected = [
            (vec![span(0, 500, g)], true),
            (vec![span(100, 10 * g, g - 100)], false),
            (vec![span(0, 11 * g - 100, g)], true),
            (vec![span(0, 12 * g - 100, 100), span(100, 0, 50)], true),
        ];
        assert_eq!(copies.len(), expected.len());
        for (copy, (spans, whole)) in copies.iter().zip(expected) {
            assert_eq!((&copy.spans, copy.whole), (&spans, whole), "group {}", copy.group);
        }
        let not_whole: Vec<u64> = GroupCopies::new(&runs, 3 * g + 150).not_whole().collect();
        assert_eq!(not_whole, vec![1]);
    }

    /// Each run names bytes the two images share, the runs' groups tile the new image, and
    /// the plan carries a hash exactly for each group not covered whole, in order.
    #[test]
    fn a_plan_places_shared_bytes_and_carries_the_other_groups_hashes() {
        let old = noise(1 << 20, 3);
        let mut new = old[..300_000].to_vec();
        new.extend(noise(20_000, 9));
        new.extend(&old[300_000..700_000]);
        new.extend(&old[720_000..]);
        let plan = plan_for(&old, &new);
        let mut read = PlanReader::new(&plan[..], new.len() as u64).expect("plan");
        assert_eq!(read.header.from_size, old.len() as u64);
        assert!(read.runs.len() >= 2, "{:?}", read.runs);
        for run in &read.runs {
            let (new_at, old_at, len) = (run.new as usize, run.old as usize, run.len as usize);
            assert_eq!(new[new_at..new_at + len], old[old_at..old_at + len]);
        }
        let shared: u64 = read.runs.iter().map(|r| r.len).sum();
        assert!(shared > 1_000_000 - 20_000 - 3 * 16_384, "shared {shared}");
        let copies: Vec<_> = read.group_copies().collect();
        assert_eq!(copies.len() as u64, (new.len() as u64).div_ceil(GROUP_BYTES));
        let not_whole: Vec<u64> = copies.iter().filter(|c| !c.whole).map(|c| c.group).collect();
        assert!(not_whole.len() >= 2 && not_whole.len() < 8, "{not_whole:?}");
        for group in not_whole {
            assert_eq!(read.next_hash().expect("hash"), marker(group).unwrap());
        }
        assert!(matches!(read.next_hash(), Err(PlanError::Hashes)), "no more hashes");
        read.finish().expect("nothing follows");
    }

    #[test]
    fn a_plan_that_is_cut_short_runs_on_or_is_for_another_image_is_refused() {
        let old = noise(200_000, 5);
        let mut new = old.clone();
        new[100_000] ^= 1;
        let plan = plan_for(&old, &new);
        let size = new.len() as u64;
        let hashes = |bytes: &[u8]| -> Result<(), PlanError> {
            let mut read = PlanReader::new(bytes, size)?;
            let count = read.group_copies().not_whole().count();
            (0..count).try_for_each(|_| read.next_hash().map(drop))?;
            read.finish()
        };
        hashes(&plan).expect("the plan as written");
        assert!(matches!(hashes(&plan[..plan.len() - 1]), Err(PlanError::Hashes)));
        assert!(matches!(hashes(&[&plan[..], &[0]].concat()), Err(PlanError::Hashes)));
        assert!(matches!(PlanReader::new(&plan[..], size + 1), Err(PlanError::Size { .. })));
        assert!(matches!(PlanReader::new(&b"SCINDEX1"[..], size), Err(PlanError::NotAPlan)));
        // A run that reaches past the older image.
        let mut far = plan[..HEADER_BYTES].to_vec();
        far[56..60].copy_from_slice(&1u32.to_le_bytes());
        for value in [0, zigzag(150_000), 100_000] {
            write_varint(&mut far, value).unwrap();
        }
        assert!(matches!(PlanReader::new(&far[..], size), Err(PlanError::BadRun(0))));
    }

    #[test]
    fn varints_and_signed_distances_read_back() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut bytes = Vec::new();
            write_varint(&mut bytes, value).unwrap();
            assert_eq!(read_varint(&mut &bytes[..]).unwrap(), value);
        }
        for value in [0, -1, 1, i64::MIN, i64::MAX, -123_456] {
            assert_eq!(unzigzag(zigzag(value)), value);
        }
        let too_long = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(read_varint(&mut &too_long[..]).is_err(), "a 65th bit");
        assert!(read_varint(&mut &[0x80, 0x80][..]).is_err(), "cut short");
    }
}
