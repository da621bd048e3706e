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

use std::collections::BTreeSet;
use std::io::Read;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use sitecast_delta::reuse::missing;
use sitecast_iso::{BlobLayout, DecodedItem, Device, FileDevice, GROUP_BYTES, OutboardStore};

use crate::coordinator::{ClientError, CoordinatorClient};
use crate::reuse::PartialGroups;
use crate::swarm::{FetchError, is_zstd, zstd_reader};

/// What patching a piece needs: where the active slot holds parts of groups, the slot itself,
/// the new image's outboard, and Central Command's plain bytes.
#[derive(Debug)]
pub struct Patches {
    pub partial: PartialGroups,
    pub active: FileDevice,
    pub outboard: OutboardStore<FileDevice>,
    pub bytes_url: String,
    /// Set once Central Command turns out not to serve plain bytes (it predates them).
    unsupported: AtomicBool,
    /// Spans (by first group) whose patching failed: fetched whole from then on.
    given_up: Mutex<BTreeSet<u64>>,
}

/// The most byte ranges in one request (Central Command's limit).
const MAX_RANGES: usize = 256;

/// A patched piece: its verified items, and the plain bytes fetched for it.
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
            unsupported: AtomicBool::new(false),
            given_up: Mutex::default(),
        }
    }

    /// The byte ranges of the image to fetch for `groups`, merged, if the active slot holds
    /// part of any of them (else the piece is fetched the usual way).
    pub fn missing(&self, layout: &BlobLayout, groups: Range<u64>) -> Option<Vec<Range<u64>>> {
        let given_up =
            self.given_up.lock().unwrap_or_else(|p| p.into_inner()).contains(&groups.start);
        if self.unsupported.load(Ordering::Relaxed) || given_up {
            return None;
        }
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
        (partly && ranges.len() <= MAX_RANGES).then_some(ranges)
    }

    /// Patching the span starting at group `first` failed: it is fetched whole from now on.
    pub fn give_up(&self, first: u64) {
        self.given_up.lock().unwrap_or_else(|p| p.into_inner()).insert(first);
    }

    /// Fetches `ranges` (from [`Patches::missing`]) of `groups` from Central Command and
    /// assembles and verifies the groups. `Ok(None)`: not patched (Central Command does not
    /// serve plain bytes, or the assembled groups do not verify): fetch the piece whole.
    pub async fn fetch(
        self: &std::sync::Arc<Self>,
        client: &CoordinatorClient,
        layout: BlobLayout,
        groups: Range<u64>,
        ranges: Vec<Range<u64>>,
    ) -> Result<Option<Patched>, FetchError> {
        let response = match client.open_bytes(&self.bytes_url, &ranges).await {
            Ok(response) => response,
            Err(ClientError::Refused { status: 404 | 405, .. }) => {
                tracing::info!("Central Command serves no plain bytes; pieces are fetched whole");
                self.unsupported.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Err(error) => return Err(FetchError::Failed(error.to_string())),
        };
        let compressed = is_zstd(&response)?;
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
        let patches = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let plain = match compressed {
                true => {
                    let mut plain = Vec::new();
                    let reader = zstd_reader(&body[..])?;
                    reader
                        .take(want + 1)
                        .read_to_end(&mut plain)
                        .map_err(|e| FetchError::Failed(format!("zstd: {e}")))?;
                    plain
                }
                false => body,
            };
            if plain.len() as u64 != want {
                return Err(FetchError::Corrupt(format!(
                    "{} bytes for the {want} asked for",
                    plain.len()
                )));
            }
            patches.assemble(layout, groups, &ranges, &plain)
        })
        .await
        .map_err(|e| FetchError::Failed(e.to_string()))?
    }

    /// The groups put together from the active slot and `fetched` (the bytes of `ranges`, in
    /// order), checked against the outboard.
    fn assemble(
        &self,
        layout: BlobLayout,
        groups: Range<u64>,
        ranges: &[Range<u64>],
        fetched: &[u8],
    ) -> Result<Option<Patched>, FetchError> {
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
            Ok(items) => Ok(Some(Patched { items, fetched: fetched.len() as u64 })),
            Err(error) => {
                tracing::warn!(?groups, %error, "groups assembled from the active slot and the origin do not verify; fetched whole");
                self.give_up(groups.start);
                Ok(None)
            }
        }
    }
}
