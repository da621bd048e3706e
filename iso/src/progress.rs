//! The durable record of which groups of a slot are verified and written.
//!
//! Layout: a 64-byte header (16-byte magic, the image's BLAKE3 root, its size, and the first
//! 8 bytes of a BLAKE3 of those 56 bytes) followed by one bit per group. Bits only ever go from
//! 0 to 1, and only after the group's data is synced, so a torn write of the bitmap can lose a
//! record but never invent one. The header is written after the zeroed bitmap is durable; a
//! torn header reads as "no progress" and the writer starts over (local seeding then recovers
//! what the slot already holds).

use std::io;

use crate::device::Device;
use crate::layout::BlobLayout;

const MAGIC: &[u8; 16] = b"sitecast-prog-v1";
const HEADER_BYTES: u64 = 64;

#[derive(Debug)]
pub(crate) struct Progress<D> {
    device: D,
    bitmap: Vec<u8>,
}

impl<D: Device> Progress<D> {
    /// Opens the record for `layout`, or starts a fresh one if it is missing, torn or for
    /// another image.
    pub(crate) fn open(mut device: D, layout: BlobLayout) -> io::Result<Self> {
        let bitmap_len = layout.groups().div_ceil(8) as usize;
        let header = header(&layout);
        let mut found = [0u8; HEADER_BYTES as usize];
        let readable = device.len()? >= HEADER_BYTES + bitmap_len as u64;
        if readable && device.read_exact_at(0, &mut found).is_ok() && found == header {
            let mut bitmap = vec![0u8; bitmap_len];
            device.read_exact_at(HEADER_BYTES, &mut bitmap)?;
            return Ok(Self { device, bitmap });
        }
        let bitmap = vec![0u8; bitmap_len];
        device.write_all_at(0, &[0u8; HEADER_BYTES as usize])?;
        device.write_all_at(HEADER_BYTES, &bitmap)?;
        device.sync()?;
        device.write_all_at(0, &header)?;
        device.sync()?;
        Ok(Self { device, bitmap })
    }

    pub(crate) fn has(&self, group: u64) -> bool {
        self.bitmap[(group / 8) as usize] & (1 << (group % 8)) != 0
    }

    pub(crate) fn count(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Records `groups` durably. Their data must already be synced.
    pub(crate) fn record(&mut self, groups: &[u64]) -> io::Result<()> {
        let (mut low, mut high) = (usize::MAX, 0);
        for &group in groups {
            let byte = (group / 8) as usize;
            self.bitmap[byte] |= 1 << (group % 8);
            low = low.min(byte);
            high = high.max(byte + 1);
        }
        if low < high {
            self.device.write_all_at(HEADER_BYTES + low as u64, &self.bitmap[low..high])?;
            self.device.sync()?;
        }
        Ok(())
    }

    /// Forgets everything (after a read-back mismatch: the slot cannot be trusted).
    pub(crate) fn clear(&mut self) -> io::Result<()> {
        self.bitmap.fill(0);
        self.device.write_all_at(HEADER_BYTES, &self.bitmap)?;
        self.device.sync()
    }
}

fn header(layout: &BlobLayout) -> [u8; HEADER_BYTES as usize] {
    let mut header = [0u8; HEADER_BYTES as usize];
    header[..16].copy_from_slice(MAGIC);
    header[16..48].copy_from_slice(layout.root.as_bytes());
    header[48..56].copy_from_slice(&layout.size.to_le_bytes());
    let check = blake3::hash(&header[..56]);
    header[56..].copy_from_slice(&check.as_bytes()[..8]);
    header
}
