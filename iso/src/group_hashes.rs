//! An image's group hashes: the BLAKE3 chaining value of each 16 KiB group, in order, 32
//! bytes a group. Half the outboard's size (which holds 64 bytes a parent, about one parent
//! a group), and enough to rebuild all of it: every parent is the hash of its two children.
//! An appliance that fetches these instead of the outboard rebuilds the outboard and trusts
//! it only if the rebuilt tree hashes to the signed root, so a wrong hash anywhere is caught
//! before any group is checked against it.

use std::io::{self, BufReader, Read, Write};

use bao_tree::io::sync::OutboardMut;
use bao_tree::iter::BaoChunk;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use sitecast_manifest::Blake3Hash;

use crate::device::Device;
use crate::layout::{BlobLayout, GROUP_BYTES, OutboardStore};

impl BlobLayout {
    /// Bytes of the group hashes: 32 a group, none for an image of one group (it has no
    /// parents to rebuild).
    pub fn group_hashes_len(&self) -> u64 {
        match self.groups() {
            0 | 1 => 0,
            groups => groups * 32,
        }
    }
}

/// Writes the group hashes of `data` (exactly `layout.size` bytes, streamed) to `out`;
/// returns the root they hash to, for the caller to check against the image's.
pub fn write_group_hashes(
    layout: BlobLayout,
    data: impl Read,
    mut out: impl Write,
) -> io::Result<Blake3Hash> {
    let mut data = BufReader::with_capacity(1 << 20, data);
    let mut group = vec![0u8; GROUP_BYTES as usize];
    let root = fold_tree(
        layout,
        |start_chunk, size, is_root| {
            let bytes = &mut group[..size];
            data.read_exact(bytes)?;
            let hash = match is_root {
                true => blake3::hash(bytes),
                false => blake3::Hash::from(group_hash(start_chunk / 16, bytes)),
            };
            if !is_root {
                out.write_all(hash.as_bytes())?;
            }
            Ok(hash)
        },
        |_, _| Ok(()),
    )?;
    out.flush()?;
    Ok(root.into())
}

/// The chaining value of group `group` of an image of more than one group, whose bytes are
/// `bytes`: what its group hashes hold for it.
pub fn group_hash(group: u64, bytes: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(group * GROUP_BYTES);
    hasher.update(bytes);
    hasher.finalize_non_root()
}

impl<D: Device> OutboardStore<D> {
    /// Rebuilds the whole outboard from the image's group hashes ([`write_group_hashes`]);
    /// returns whether they hash to the layout's root. Only then is the outboard to be
    /// trusted: group hashes come from wherever they were fetched.
    pub fn rebuild_from_group_hashes(&mut self, hashes: impl Read) -> io::Result<bool> {
        let layout = self.layout();
        if layout.groups() <= 1 {
            return Ok(true);
        }
        let mut hashes = BufReader::with_capacity(64 * 1024, hashes);
        let mut writer = self.writer();
        let root = fold_tree(
            layout,
            |_, _, _| {
                let mut hash = [0u8; 32];
                hashes.read_exact(&mut hash)?;
                Ok(blake3::Hash::from(hash))
            },
            |node, pair| writer.save(node, pair),
        )?;
        // Nothing may follow the last group's hash.
        let trailing = hashes.read(&mut [0u8; 1])? != 0;
        self.sync()?;
        Ok(!trailing && Blake3Hash::from(root) == layout.root)
    }
}

/// Walks `layout`'s tree in post-order: `leaf(start_chunk, size, is_root)` gives each group's
/// hash, in order; each parent is computed from its children and handed to `parent`. Returns
/// the root.
fn fold_tree(
    layout: BlobLayout,
    mut leaf: impl FnMut(u64, usize, bool) -> io::Result<blake3::Hash>,
    mut parent: impl FnMut(bao_tree::TreeNode, &(blake3::Hash, blake3::Hash)) -> io::Result<()>,
) -> io::Result<blake3::Hash> {
    let mut stack: Vec<blake3::Hash> = Vec::new();
    for item in layout.tree().post_order_chunks_iter() {
        match item {
            BaoChunk::Leaf { start_chunk, size, is_root, .. } => {
                stack.push(leaf(start_chunk.0, size, is_root)?);
            }
            BaoChunk::Parent { node, is_root, .. } => {
                let (Some(right), Some(left)) = (stack.pop(), stack.pop()) else {
                    unreachable!("a parent in post-order follows both its children");
                };
                parent(node, &(left, right))?;
                let (l, r): (ChainingValue, ChainingValue) = (*left.as_bytes(), *right.as_bytes());
                stack.push(match is_root {
                    true => merge_subtrees_root(&l, &r, Mode::Hash),
                    false => blake3::Hash::from(merge_subtrees_non_root(&l, &r, Mode::Hash)),
                });
            }
        }
    }
    Ok(stack.pop().unwrap_or_else(|| blake3::hash(&[])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{CrashDevice, PowerSupply};

    /// A device of the outboard's length, in memory.
    fn device(layout: BlobLayout) -> CrashDevice {
        CrashDevice::new(layout.outboard_len() as usize, PowerSupply::new())
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        blake3::Hasher::new_derive_key("group hashes").finalize_xof().fill(&mut bytes);
        bytes
    }

    /// The outboard rebuilt from the group hashes, byte for byte the one computed from the
    /// data, for images of every shape of tree.
    #[test]
    fn the_outboard_rebuilt_from_group_hashes_is_the_one_computed_from_the_data() {
        let g = GROUP_BYTES as usize;
        for len in [0, 1, g, g + 1, 2 * g, 3 * g - 7, 5 * g, 64 * g + 100, 1000 * g + 5] {
            let data = noise(len);
            let layout = BlobLayout::new(blake3::hash(&data).into(), len as u64);
            let mut hashes = Vec::new();
            let root = write_group_hashes(layout, &data[..], &mut hashes).expect("hashes");
            assert_eq!(root, layout.root, "{len} bytes");
            assert_eq!(hashes.len() as u64, layout.group_hashes_len(), "{len} bytes");

            let mut computed = OutboardStore::new(layout, device(layout));
            computed.compute_from(&data[..]).expect("outboard");
            let mut rebuilt = OutboardStore::new(layout, device(layout));
            assert!(rebuilt.rebuild_from_group_hashes(&hashes[..]).expect("rebuild"), "{len}");
            assert_eq!(rebuilt.device_mut().live(), computed.device_mut().live(), "{len} bytes");
        }
    }

    /// A wrong hash anywhere, one missing, or one too many: the rebuilt tree does not hash to
    /// the root.
    #[test]
    fn group_hashes_that_are_not_the_images_do_not_hash_to_its_root() {
        let data = noise(37 * GROUP_BYTES as usize + 99);
        let layout = BlobLayout::new(blake3::hash(&data).into(), data.len() as u64);
        let mut hashes = Vec::new();
        write_group_hashes(layout, &data[..], &mut hashes).expect("hashes");
        for at in [0, 32 * 17 + 5, hashes.len() - 1] {
            let mut wrong = hashes.clone();
            wrong[at] ^= 1;
            let mut outboard = OutboardStore::new(layout, device(layout));
            assert!(!outboard.rebuild_from_group_hashes(&wrong[..]).expect("rebuild"), "{at}");
        }
        let mut outboard = OutboardStore::new(layout, device(layout));
        let short = outboard.rebuild_from_group_hashes(&hashes[..hashes.len() - 32]);
        assert_eq!(short.expect_err("short").kind(), io::ErrorKind::UnexpectedEof);
        let long = [&hashes[..], &[0u8; 32]].concat();
        assert!(!outboard.rebuild_from_group_hashes(&long[..]).expect("rebuild"));
    }
}
