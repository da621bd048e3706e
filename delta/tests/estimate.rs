//! Generated pairs of images with data inserted, deleted, moved: what the estimate says an
//! update fetches stays near what changed, wherever the rest moved to.

mod common;

use common::noise;
use proptest::prelude::*;
use sitecast_delta::*;

fn chunked(image: &[u8]) -> Vec<Chunk> {
    chunks(image, Chunking::default()).expect("in memory")
}

const MIB: usize = 1024 * 1024;
/// What one change can cost at most: the chunk it lands in, the one cut differently after it
/// until the cut points line up again, and the groups around them.
const ONE_CHANGE: u64 = 3 * 16 * 1024;

#[test]
fn the_same_image_reuses_everything() {
    let image = noise(4 * MIB + 321, 1);
    let estimate = estimate(&chunked(&image), &chunked(&image));
    assert_eq!(estimate.image_bytes, image.len() as u64);
    assert_eq!(estimate.reused_bytes, image.len() as u64);
    assert_eq!((estimate.missing_bytes, estimate.groups_missing), (0, 0));
}

#[test]
fn an_unrelated_image_reuses_nothing() {
    let (old, new) = (noise(2 * MIB, 1), noise(2 * MIB, 2));
    let estimate = estimate(&chunked(&old), &chunked(&new));
    assert_eq!(estimate.missing_bytes, new.len() as u64);
    assert_eq!(estimate.missing_group_bytes, new.len() as u64);
    assert_eq!(estimate.groups_missing, estimate.groups);
}

#[test]
fn inserted_deleted_and_moved_data_cost_about_what_changed() {
    let old = noise(8 * MIB, 3);
    let inserted = noise(10_000, 4);
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("100 bytes inserted", [&old[..3 * MIB], &inserted[..100], &old[3 * MIB..]].concat(), 100),
        ("10 kB inserted", [&old[..MIB], &inserted, &old[MIB..]].concat(), 10_000),
        ("5 kB deleted", [&old[..5 * MIB], &old[5 * MIB + 5000..]].concat(), 0),
        ("the first MiB moved to the end", [&old[MIB..], &old[..MIB]].concat(), 0),
        (
            "one byte changed",
            {
                let mut new = old.clone();
                new[6 * MIB] ^= 1;
                new
            },
            1,
        ),
    ];
    for (what, new, changed) in cases {
        let estimate = estimate(&chunked(&old), &chunked(&new));
        assert_eq!(estimate.image_bytes, new.len() as u64, "{what}");
        assert!(estimate.missing_bytes >= changed, "{what}: {estimate:?}");
        assert!(
            estimate.missing_bytes <= changed + ONE_CHANGE,
            "{what}: {} bytes to fetch for {changed} changed: {estimate:?}",
            estimate.missing_bytes
        );
        assert!(estimate.missing_group_bytes <= changed + 2 * ONE_CHANGE, "{what}: {estimate:?}");
        // Whole groups (16 KiB, and each touched one whole) fetch no less than chunk ranges.
        assert!(estimate.missing_group_bytes >= estimate.missing_bytes, "{what}: {estimate:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Chunks cover the image exactly, in order, within their sizes (the last may be short),
    /// and the estimate's figures add up.
    #[test]
    fn chunks_cover_the_image_and_the_figures_add_up(
        len in 0usize..300_000,
        seed in any::<u64>(),
        avg in prop::sample::select(vec![256u32, 1024, 4096]),
        cut in any::<prop::sample::Index>(),
    ) {
        let image = noise(len, seed);
        let chunking = Chunking::around(avg);
        let list = chunks(&image[..], chunking).expect("in memory");
        let mut at = 0;
        for (i, chunk) in list.iter().enumerate() {
            prop_assert_eq!(chunk.offset, at);
            prop_assert!(chunk.len <= chunking.max);
            prop_assert!(chunk.len >= chunking.min || i == list.len() - 1);
            at += u64::from(chunk.len);
        }
        prop_assert_eq!(at, len as u64);

        // The old image: the new one's first part.
        let old = &image[..cut.index(len.max(1)).min(len)];
        let old = chunks(old, chunking).expect("in memory");
        let estimate = estimate(&old, &list);
        prop_assert_eq!(estimate.reused_bytes + estimate.missing_bytes, len as u64);
        prop_assert!(estimate.missing_bytes <= estimate.missing_group_bytes);
        prop_assert!(estimate.missing_group_bytes <= len as u64);
        prop_assert_eq!(estimate.groups, (len as u64).div_ceil(GROUP_BYTES));
    }
}
