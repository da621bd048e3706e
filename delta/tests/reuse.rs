//! The content index read back as written, refused when damaged; and the groups an older
//! image can fill, assembled from its spans, are the new image's bytes.

mod common;

use common::noise;
use proptest::prelude::*;
use sitecast_delta::index::{self, IndexEntry, IndexError, IndexReader};
use sitecast_delta::reuse::{GroupPlanner, OlderImage};
use sitecast_delta::*;

fn index_of(image: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    index::write(image, Chunking::default(), &mut out).expect("in memory");
    out
}

fn read_all(index: &[u8], size: u64) -> Result<Vec<IndexEntry>, IndexError> {
    IndexReader::new(index, size)?.collect()
}

#[test]
fn an_index_reads_back_as_the_image_was_chunked() {
    let image = noise(3 * 1024 * 1024 + 77, 1);
    let index = index_of(&image);
    let chunks = chunks(&image[..], Chunking::default()).expect("chunks");
    let entries: Vec<IndexEntry> = chunks.iter().map(IndexEntry::from).collect();
    assert_eq!(read_all(&index, image.len() as u64).expect("index"), entries);
    assert_eq!(index.len(), 24 + 12 * chunks.len(), "header and one entry per chunk");
    assert_eq!(IndexReader::new(&index[..], 1).expect("header").chunking(), Chunking::default());
}

#[test]
fn a_damaged_index_is_refused_with_what_is_wrong() {
    let image = noise(200_000, 2);
    let index = index_of(&image);
    let size = image.len() as u64;
    // Cut off mid-entry, or a whole entry short, or for another image's size.
    assert!(matches!(read_all(&index[..index.len() - 5], size), Err(IndexError::Coverage { .. })));
    assert!(matches!(read_all(&index[..index.len() - 12], size), Err(IndexError::Coverage { .. })));
    assert!(matches!(read_all(&index, size - 1), Err(IndexError::Coverage { .. })));
    assert!(matches!(read_all(&index, size + 1), Err(IndexError::Coverage { .. })));
    // Not an index at all, or chunk sizes FastCDC would panic on.
    assert!(matches!(read_all(b"{\"json\": true}", size), Err(IndexError::NotAnIndex)));
    assert!(matches!(read_all(b"", size), Err(IndexError::NotAnIndex)));
    let mut bad = index.clone();
    bad[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(read_all(&bad, size), Err(IndexError::Chunking { .. })));
    // A zero-length chunk would never advance.
    let mut bad = index.clone();
    bad[24..28].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(read_all(&bad, size), Err(IndexError::ChunkLength { chunk: 0, .. })));
}

/// The groups `older` fills of `new`, each assembled from its spans (the rest of a group it
/// fills in part taken from `new`, as if fetched); checks each equals the new image's group
/// and returns how many bytes of whole groups were placed.
fn copied_bytes(older_image: &[u8], new: &[u8]) -> u64 {
    let older = OlderImage::read(older_image, Chunking::default()).expect("older");
    let mut planner = GroupPlanner::new(&older, new.len() as u64);
    let mut placed = 0;
    for chunk in chunks(new, Chunking::default()).expect("chunks") {
        for copy in planner.push(&IndexEntry::from(&chunk)) {
            let start = copy.group as usize * 16384;
            let expected = &new[start..(start + 16384).min(new.len())];
            let mut group = vec![None; expected.len()];
            for span in &copy.spans {
                let (from, at, len) = (span.from as usize, span.at as usize, span.len as usize);
                for (i, byte) in older_image[from..from + len].iter().enumerate() {
                    assert!(group[at + i].replace(*byte).is_none(), "spans overlap");
                }
            }
            for range in copy.missing(expected.len() as u32) {
                for i in range {
                    assert!(group[i as usize].replace(new[start + i as usize]).is_none());
                }
            }
            let group: Vec<u8> = group.into_iter().map(|b| b.expect("every byte placed")).collect();
            assert_eq!(group, expected, "group {}", copy.group);
            assert_eq!(copy.whole, copy.missing(expected.len() as u32).is_empty());
            if copy.whole {
                placed += copy.len();
            }
        }
    }
    placed
}

#[test]
fn an_update_with_a_change_in_the_middle_copies_all_but_the_groups_around_it() {
    let old = noise(4 * 1024 * 1024, 3);
    let new = [&old[..2_000_000], &noise(5000, 4)[..], &old[2_000_000..]].concat();
    let placed = copied_bytes(&old, &new);
    let missing = new.len() as u64 - placed;
    // The change, the chunks cut differently around it, rounded out to whole groups.
    assert!((5000..=5000 + 4 * 16384).contains(&missing), "{missing} bytes not copied");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn every_copied_group_is_the_new_images_bytes(
        seed in 1u64..1000,
        cut in 0usize..600_000,
        insert in 0usize..40_000,
        delete in 0usize..40_000,
    ) {
        let old = noise(700_000, seed);
        let cut = cut.min(old.len());
        let end = (cut + delete).min(old.len());
        let new = [&old[..cut], &noise(insert, seed + 1)[..], &old[end..]].concat();
        prop_assume!(!new.is_empty());
        copied_bytes(&old, &new);
    }
}
