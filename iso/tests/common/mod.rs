//! An image, its outboard (what an origin or a seeding peer holds), and responses made from it.
#![allow(dead_code, unreachable_pub)]

use std::ops::Range;

use sitecast_iso::*;
use sitecast_manifest::{ImageDigest, ImageInfo};

pub struct Origin {
    pub image: Vec<u8>,
    pub info: ImageInfo,
    pub data: CrashDevice,
    pub outboard: OutboardStore<CrashDevice>,
}

impl Origin {
    pub fn new(len: usize, seed: u8) -> Self {
        let image: Vec<u8> =
            (0..len).map(|i| (i as u8).wrapping_mul(seed).wrapping_add((i >> 13) as u8)).collect();
        let digest = ImageDigest::of_reader(&image[..]).expect("hash");
        let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
        let power = PowerSupply::new();
        let data = CrashDevice::new(len, power.clone());
        data.preload(0, &image);
        let layout = BlobLayout::new(info.blake3, info.size);
        let mut outboard =
            OutboardStore::new(layout, CrashDevice::new(layout.outboard_len() as usize, power));
        let root = outboard.compute_from(&image[..]).expect("outboard");
        assert_eq!(root, info.blake3);
        Self { image, info, data, outboard }
    }

    pub fn layout(&self) -> BlobLayout {
        self.outboard.layout()
    }

    /// The response bytes for `groups`, as a peer or the origin sends them.
    pub fn response(&self, groups: Range<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        self.outboard.encode_groups(&self.data, groups, &mut out).expect("encode");
        out
    }
}

/// Feeds a response for `groups` into `writer`.
pub fn deliver<D: Device>(
    writer: &mut SlotWriter<D>,
    origin: &Origin,
    groups: Range<u64>,
    bytes: &[u8],
) -> Result<u64, SlotError> {
    let ranges = origin.layout().chunk_ranges(groups);
    let decoder = ResponseDecoder::new(origin.layout(), &ranges, bytes)?;
    writer.ingest(decoder)
}
