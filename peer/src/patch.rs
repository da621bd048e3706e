//! Fetching only the rest of groups the active slot holds in part. Where a new image's
//! changes begin and end, a 16 KiB group is partly chunks the active slot has and partly new
//! bytes ([`crate::reuse::PartialGroups`]). For a piece with such groups, the origin is asked
//! for plain bytes (`OriginUrls::bytes`): the missing parts of those groups and the other
//! groups of the piece's span whole, in one request. The groups are assembled from both and
//! checked against the outboard (the same decoder as any response) before the writer sees
//! them. If a group does not verify (a damaged active slot, a key clash in the index, a lying
//! origin), or anything else goes wrong (a refusal, the active slot unreadable), the piece is
//! fetched whole instead, the usual way (from the release's mirrors if it has any, else as
//! Central Command's verified ranges), in the same request and from then on.
//!
//! When the agent knows which release its active slot holds, every piece left to the origin
//! goes this way, and Central Command compresses the bytes asked for against a stretch of
//! that release near where they sit ([`sitecast_delta::reference`]); the agent reads the
//! same stretch from its active slot to decompress. Bytes decompressed against a damaged
//! slot do not verify: that piece is fetched whole, and no reference is used after.

use std::collections::BTreeSet;
use std::io::Read;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use sitecast_delta::reference::{MAX_REFERENCE, SharedRuns};
use sitecast_delta::reuse::missing;
use sitecast_iso::{BlobLayout, DecodedItem, Device, FileDevice, GROUP_BYTES, OutboardStore};

use crate::coordinator::{ClientError, CoordinatorClient};
use crate::reuse::PartialGroups;
use crate::swarm::{FetchError, is_zstd, zstd_reader, zstd_reader_against};

/// What patching a piece needs: where the active slot holds parts of groups, the slot itself,
/// the new image's outboard, and Central Command's plain bytes.
#[derive(Debug)]
pub struct Patches {
    pub partial: PartialGroups,
    pub active: FileDevice,
    pub outboard: OutboardStore<FileDevice>,
    pub bytes_url: String,
    /// The active slot's release (the BLAKE3 of its image, hex) and where the new image's
    /// shared bytes sit in it: answers may be compressed against the slot's bytes.
    reference: Option<(String, SharedRuns)>,
    /// Set once bytes decompressed against a reference did not verify.
    references_off: AtomicBool,
    /// Decompressions against a reference under way: each holds the reference and zstd's
    /// window (up to 14 MiB), so at most [`DECODING_AGAINST`] at once.
    decoding: tokio::sync::Semaphore,
    /// Set once Central Command turns out not to serve plain bytes (it predates them).
    unsupported: AtomicBool,
    /// Spans (by first group) whose patching failed: fetched whole from then on.
    given_up: Mutex<BTreeSet<u64>>,
}

/// Decompressions against a reference at once (the origin's requests in flight may be more).
const DECODING_AGAINST: usize = 2;

/// The most byte ranges in one request (Central Command's limit).
const MAX_RANGES: usize = 256;

/// What to ask Central Command for a piece: byte ranges of the new image, merged, and the
/// stretch of the active slot to compress them against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BytesWanted {
    pub ranges: Vec<Range<u64>>,
    pub reference: Option<Range<u64>>,
}

/// A patched piece: its verified items, and the bytes it took on the wire.
#[derive(Debug)]
pub struct Patched {
    pub items: Vec<DecodedItem>,
    pub fetched: u64,
}

impl Patches {
    pub fn new(
        partial: PartialGroups,
        active: FileDevice,
        outboard: OutboardStore<FileDevice>,
        bytes_url: String,
    ) -> Self {
        Self {
            partial,
            active,
            outboard,
            bytes_url,
            reference: None,
            references_off: AtomicBool::new(false),
            decoding: tokio::sync::Semaphore::new(DECODING_AGAINST),
            unsupported: AtomicBool::new(false),
            given_up: Mutex::default(),
        }
    }

    /// Compresses against the active slot, whose image has the BLAKE3 `from` (hex), using
    /// `runs` to find the bytes near each piece.
    pub fn with_reference(mut self, reference: Option<(String, SharedRuns)>) -> Self {
        self.reference = reference;
        self
    }

    /// What to fetch for `groups`, if the active slot holds part of any of them or has bytes
    /// to compress them against (else the piece is fetched the usual way).
    pub fn missing(&self, layout: &BlobLayout, groups: Range<u64>) -> Option<BytesWanted> {
        let given_up =
            self.given_up.lock().unwrap_or_else(|p| p.into_inner()).contains(&groups.start);
        if self.unsupported.load(Ordering::Relaxed) || given_up {
            return None;
        }
        let reference = match (&self.reference, self.references_off.load(Ordering::Relaxed)) {
            (Some((_, runs)), false) => {
                let span =
                    layout.group_bytes(groups.start).start..layout.group_bytes(groups.end - 1).end;
                runs.reference(span).filter(|r| r.end - r.start <= MAX_REFERENCE)
            }
            _ => None,
        };
        let mut partly = false;
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for group in groups {
            let bytes = layout.group_bytes(group);
            let parts: Vec<Range<u64>> = match self.partial.get(group) {
                Some(spans) => {
                    partly = true;
                    let missing = missing(spans, (bytes.end - bytes.start) as u32).into_iter();
                    let to_image = |r: Range<u32>| {
                        bytes.start + u64::from(r.start)..bytes.start + u64::from(r.end)
                    };
                    missing.map(to_image).collect()
                }
                None => vec![bytes],
            };
            for part in parts {
                match ranges.last_mut() {
                    Some(last) if last.end == part.start => last.end = part.end,
                    _ => ranges.push(part),
                }
            }
        }
        ((partly || reference.is_some()) && ranges.len() <= MAX_RANGES)
            .then_some(BytesWanted { ranges, reference })
    }

    /// Patching the span starting at group `first` failed: it is fetched whole from now on.
    pub fn give_up(&self, first: u64) {
        self.given_up.lock().unwrap_or_else(|p| p.into_inner()).insert(first);
    }

    /// Fetches what [`Patches::missing`] said of `groups` from Central Command and assembles
    /// and verifies the groups. `Ok(None)`: not patched (Central Command does not serve plain
    /// bytes, or the assembled groups do not verify): fetch the piece whole.
    pub async fn fetch(
        self: &std::sync::Arc<Self>,
        client: &CoordinatorClient,
        layout: BlobLayout,
        groups: Range<u64>,
        wanted: BytesWanted,
    ) -> Result<Option<Patched>, FetchError> {
        let BytesWanted { ranges, reference } = wanted;
        let asked = self.reference.as_ref().map(|(from, _)| from.as_str()).zip(reference.clone());
        let response = match client.open_bytes(&self.bytes_url, &ranges, asked).await {
            Ok(response) => response,
            Err(ClientError::Refused { status: 404 | 405, .. }) => {
                tracing::info!("Central Command serves no plain bytes; pieces are fetched whole");
                self.unsupported.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Err(error) => return Err(FetchError::Failed(error.to_string())),
        };
        let compressed = is_zstd(&response)?;
        // Central Command says whether it used the reference; one it was not asked for is
        // not what this agent can decompress.
        let used = response.headers().get(sitecast_manifest::api::HEADER_REFERENCE);
        let used = match (used, &reference) {
            (None, _) => None,
            (Some(value), Some(asked))
                if value.as_bytes() == format!("{}-{}", asked.start, asked.end).as_bytes()
                    && compressed =>
            {
                Some(asked.clone())
            }
            (Some(value), _) => {
                return Err(FetchError::Corrupt(format!(
                    "the origin compressed against reference {value:?}, not the one asked for"
                )));
            }
        };
        let want: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        // What crosses the wire is at most the bytes asked for (plain) or slightly more
        // (zstd's frame around bytes that do not compress): read no further.
        let limit = want + want / 64 + 4096;
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) =
            response.chunk().await.map_err(|e| FetchError::Failed(e.to_string()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > limit {
                return Err(FetchError::Corrupt(format!("more than the {want} bytes asked for")));
            }
        }
        let wire = body.len() as u64;
        let permit = match used {
            Some(_) => Some(self.decoding.acquire().await),
            None => None,
        };
        let patches = std::sync::Arc::clone(self);
        let patched = tokio::task::spawn_blocking(move || {
            let plain = match (compressed, used) {
                (true, Some(reference)) => match patches.against(&reference, &body, want) {
                    Ok(plain) => plain,
                    Err(error) => {
                        // The slot's bytes are not the release's (damaged, or another
                        // release than recorded), or the origin's are not what it said.
                        tracing::warn!(%error, "decompressing against the active slot failed; fetched whole, and no reference used from now on");
                        patches.give_up(groups.start);
                        patches.references_off.store(true, Ordering::Relaxed);
                        return Ok(None);
                    }
                },
                (true, None) => read_all(zstd_reader(&body[..])?, want)?,
                (false, _) => body,
            };
            if plain.len() as u64 != want {
                return Err(FetchError::Corrupt(format!(
                    "{} bytes for the {want} asked for",
                    plain.len()
                )));
            }
            let items = patches.assemble(layout, groups, &ranges, &plain)?;
            Ok(items.map(|items| Patched { items, fetched: wire }))
        })
        .await;
        drop(permit);
        patched.map_err(|e| FetchError::Failed(e.to_string()))?
    }

    /// `body` decompressed against the active slot's bytes `reference`.
    fn against(&self, reference: &Range<u64>, body: &[u8], want: u64) -> Result<Vec<u8>, String> {
        let mut prefix = vec![0; (reference.end - reference.start) as usize];
        let read = self.active.read_exact_at(reference.start, &mut prefix);
        read.map_err(|error| format!("reading the active slot: {error}"))?;
        let reader = zstd_reader_against(body, &prefix).map_err(|e| format!("{e:?}"))?;
        read_all(reader, want).map_err(|e| format!("{e:?}"))
    }

    /// The groups put together from the active slot and `fetched` (the bytes of `ranges`, in
    /// order), checked against the outboard: their verified items.
    fn assemble(
        &self,
        layout: BlobLayout,
        groups: Range<u64>,
        ranges: &[Range<u64>],
        fetched: &[u8],
    ) -> Result<Option<Vec<DecodedItem>>, FetchError> {
        let start = groups.start * GROUP_BYTES;
        let end = (groups.end * GROUP_BYTES).min(layout.size);
        let mut bytes = vec![0; (end - start) as usize];
        for group in groups.clone() {
            for span in self.partial.get(group).unwrap_or_default() {
                let at = (group * GROUP_BYTES + u64::from(span.at) - start) as usize;
                let into = &mut bytes[at..at + span.len as usize];
                if let Err(error) = self.active.read_exact_at(span.from, into) {
                    tracing::warn!(?groups, %error, "reading the active slot failed; fetched whole");
                    self.give_up(groups.start);
                    return Ok(None);
                }
            }
        }
        let mut taken = 0;
        for range in ranges {
            let len = (range.end - range.start) as usize;
            let at = (range.start - start) as usize;
            bytes[at..at + len].copy_from_slice(&fetched[taken..taken + len]);
            taken += len;
        }
        match self.outboard.verify_plain(groups.clone(), &bytes) {
            Ok(items) => Ok(Some(items)),
            Err(error) => {
                tracing::warn!(?groups, %error, "groups assembled from the active slot and the origin do not verify; fetched whole");
                self.give_up(groups.start);
                // A damaged slot decompresses wrong wherever it is used as a reference.
                self.references_off.store(true, Ordering::Relaxed);
                Ok(None)
            }
        }
    }
}

/// What `reader` decompresses, up to one byte past `want` (so a longer answer is seen).
fn read_all(reader: impl Read, want: u64) -> Result<Vec<u8>, FetchError> {
    let mut plain = Vec::new();
    reader
        .take(want + 1)
        .read_to_end(&mut plain)
        .map_err(|e| FetchError::Failed(format!("zstd: {e}")))?;
    Ok(plain)
}
