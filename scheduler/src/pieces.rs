//! How a transfer is cut into pieces, and sets of pieces, sent between peers as compact ranges.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The most 16 KiB groups in a piece: 1 MiB requests amortize a round trip and keep memory
/// small.
pub const MAX_GROUPS_PER_PIECE: u64 = 64;

/// The fewest groups in a piece. In the simulator one-group pieces meet the time goal on
/// more small transfers (a piece is relayed sooner after it lands), and two emulated
/// appliances (`netsim/tests/vm.rs`) now share 16 KiB pieces as they should; but in the
/// namespace lab a delta site then took 1.13 × from the origin what none held where the
/// simulator predicts 1.02 (with 64 KiB pieces: within 1.1). Pieces stay at 64 KiB until
/// that gap is understood.
pub const MIN_GROUPS_PER_PIECE: u64 = 4;

/// A transfer is cut into at least this many pieces where its groups allow: with fewer, a
/// large site has too few pieces per appliance to spread the origin's copy among its members
/// and to keep every link busy to the end.
pub const TARGET_PIECES: u64 = 2048;

/// The pieces of a transfer of `groups` 16 KiB groups: every piece but the last has
/// `groups_per_piece` groups, a power of two from [`MIN_GROUPS_PER_PIECE`] to
/// [`MAX_GROUPS_PER_PIECE`] that depends
/// on the transfer alone, so every appliance of a site cuts it the same way. (Have-maps count
/// pieces: an agent that cuts a transfer otherwise ignores them, and fetches on its own.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceLayout {
    groups: u64,
    groups_per_piece: u64,
}

impl PieceLayout {
    pub fn new(groups: u64) -> Self {
        let wanted = (groups / TARGET_PIECES).max(MIN_GROUPS_PER_PIECE);
        let power_of_two = 1 << (63 - wanted.leading_zeros());
        Self { groups, groups_per_piece: power_of_two.min(MAX_GROUPS_PER_PIECE) }
    }

    pub fn groups_per_piece(&self) -> u64 {
        self.groups_per_piece
    }

    pub fn pieces(&self) -> u64 {
        self.groups.div_ceil(self.groups_per_piece)
    }

    /// The groups of `piece`.
    pub fn groups_of(&self, piece: u64) -> Range<u64> {
        let start = piece * self.groups_per_piece;
        start..(start + self.groups_per_piece).min(self.groups)
    }

    /// The pieces that hold some of `groups`.
    pub fn pieces_touching(&self, groups: Range<u64>) -> Range<u64> {
        groups.start / self.groups_per_piece..groups.end.div_ceil(self.groups_per_piece)
    }
}

/// A set of piece indices below `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceSet {
    bits: Vec<u64>,
    len: u64,
    count: u64,
}

impl PieceSet {
    pub fn empty(len: u64) -> Self {
        Self { bits: vec![0; len.div_ceil(64) as usize], len, count: 0 }
    }

    pub fn full(len: u64) -> Self {
        let mut set = Self::empty(len);
        set.insert_range(0..len);
        set
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn contains(&self, piece: u64) -> bool {
        piece < self.len && self.bits[(piece / 64) as usize] & (1 << (piece % 64)) != 0
    }

    /// Adds `piece`; returns whether it was new.
    pub fn insert(&mut self, piece: u64) -> bool {
        if piece >= self.len || self.contains(piece) {
            return false;
        }
        self.bits[(piece / 64) as usize] |= 1 << (piece % 64);
        self.count += 1;
        true
    }

    /// Removes `piece`; returns whether it was there.
    pub fn remove(&mut self, piece: u64) -> bool {
        if !self.contains(piece) {
            return false;
        }
        self.bits[(piece / 64) as usize] &= !(1 << (piece % 64));
        self.count -= 1;
        true
    }

    pub fn insert_range(&mut self, range: Range<u64>) {
        for piece in range.start..range.end.min(self.len) {
            self.insert(piece);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| pieces_in(w, word))
    }

    /// The set as bits, 64 pieces to a word, piece `64·w + b` at bit `b` of word `w`; bits at
    /// and past `len` are zero. Schedulers combine sets a word at a time.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Word `w` of the complement: the pieces below `len` that are not in the set.
    pub fn missing_word(&self, w: usize) -> u64 {
        let tail = self.len - 64 * w as u64;
        let valid = if tail >= 64 { !0 } else { (1 << tail) - 1 };
        !self.bits[w] & valid
    }

    /// The set as ascending, non-adjacent ranges: what goes on the wire.
    pub fn to_ranges(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for piece in self.iter() {
            match ranges.last_mut() {
                Some(last) if last.end == piece => last.end += 1,
                _ => ranges.push(piece..piece + 1),
            }
        }
        ranges
    }

    /// Reads ranges from a peer; parts outside `0..len` are ignored.
    pub fn from_ranges(len: u64, ranges: &[Range<u64>]) -> Self {
        let mut set = Self::empty(len);
        for range in ranges {
            set.insert_range(range.clone());
        }
        set
    }
}

/// The pieces whose bits are set in `word`, word `w` of a set, in ascending order.
pub fn pieces_in(w: usize, mut word: u64) -> impl Iterator<Item = u64> {
    std::iter::from_fn(move || {
        if word == 0 {
            return None;
        }
        let bit = word.trailing_zeros();
        word &= word - 1;
        Some(64 * w as u64 + u64::from(bit))
    })
}

/// A have-map as it travels: piece count and ranges. On the wire the ranges become a
/// bitmap where that is shorter (a set held in scattered pieces, as it is halfway through a
/// swarm): every site peer hears every announcement, so their size is the control plane's
/// share of a LAN link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireHaveMap", try_from = "WireHaveMap")]
pub struct HaveMap {
    pub pieces: u64,
    pub ranges: Vec<(u64, u64)>,
}

/// [`HaveMap`] as JSON: `ranges`, or `bits` (hex, piece `8·i + b` at bit `b` of byte `i`).
#[derive(Serialize, Deserialize)]
struct WireHaveMap {
    pieces: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ranges: Option<Vec<(u64, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bits: Option<String>,
}

/// Bitmaps above this many pieces are refused as a have-map (4 GiB is 4096 pieces, 1 TiB
/// about a million): decoded, a scattered bitmap is ranges sixteen times its size.
const MAX_BITMAP_PIECES: u64 = 1 << 20;

impl From<HaveMap> for WireHaveMap {
    fn from(map: HaveMap) -> Self {
        let decimal_len = |n: u64| n.checked_ilog10().unwrap_or(0) as usize + 1;
        // `[a,b],` for each range, against two hex digits for each byte of the bitmap.
        let ranges_len: usize =
            map.ranges.iter().map(|&(a, b)| decimal_len(a) + decimal_len(b) + 4).sum();
        let bitmap_len = 2 * map.pieces.div_ceil(8) as usize;
        if bitmap_len >= ranges_len {
            return Self { pieces: map.pieces, ranges: Some(map.ranges), bits: None };
        }
        let mut bytes = vec![0u8; map.pieces.div_ceil(8) as usize];
        for &(start, end) in &map.ranges {
            for piece in start..end.min(map.pieces) {
                bytes[(piece / 8) as usize] |= 1 << (piece % 8);
            }
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self { pieces: map.pieces, ranges: None, bits: Some(hex) }
    }
}

impl TryFrom<WireHaveMap> for HaveMap {
    type Error = String;

    fn try_from(wire: WireHaveMap) -> Result<Self, String> {
        let Some(bits) = wire.bits else {
            return Ok(Self { pieces: wire.pieces, ranges: wire.ranges.unwrap_or_default() });
        };
        if wire.pieces > MAX_BITMAP_PIECES {
            return Err(format!("a bitmap of {} pieces", wire.pieces));
        }
        if bits.len() != 2 * wire.pieces.div_ceil(8) as usize {
            return Err(format!("{} hex digits for {} pieces", bits.len(), wire.pieces));
        }
        if !bits.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err("a bitmap that is not hex".into());
        }
        let mut set = PieceSet::empty(wire.pieces);
        for (i, pair) in bits.as_bytes().chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).expect("hex digits are ASCII");
            let byte = u8::from_str_radix(text, 16).expect("two hex digits");
            for bit in 0..8 {
                let piece = 8 * i as u64 + bit;
                if byte & (1 << bit) != 0 && piece < wire.pieces {
                    set.insert(piece);
                }
            }
        }
        Ok(Self::from(&set))
    }
}

impl From<&PieceSet> for HaveMap {
    fn from(set: &PieceSet) -> Self {
        Self {
            pieces: set.len(),
            ranges: set.to_ranges().into_iter().map(|r| (r.start, r.end)).collect(),
        }
    }
}

impl HaveMap {
    pub fn to_set(&self, pieces: u64) -> PieceSet {
        let ranges: Vec<Range<u64>> = self.ranges.iter().map(|&(s, e)| s..e).collect();
        PieceSet::from_ranges(pieces, &ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_shrink_with_the_transfer_down_to_the_smallest() {
        let layout = |groups| {
            let layout = PieceLayout::new(groups);
            (layout.groups_per_piece(), layout.pieces())
        };
        assert_eq!(layout(1), (MIN_GROUPS_PER_PIECE, 1));
        assert_eq!(layout(256), (MIN_GROUPS_PER_PIECE, 256 / MIN_GROUPS_PER_PIECE), "4 MiB");
        assert_eq!(layout(4096), (MIN_GROUPS_PER_PIECE, 4096 / MIN_GROUPS_PER_PIECE), "64 MiB");
        assert_eq!(layout(16384), (8, 2048), "256 MiB");
        assert_eq!(layout(24000), (8, 3000), "rounded down to a power of two");
        assert_eq!(layout(65536), (32, 2048), "1 GiB");
        assert_eq!(layout(262_144), (64, 4096), "4 GiB: at most 64 groups a piece");
        assert_eq!(layout(262_145), (64, 4097));
        let odd = PieceLayout::new(16387);
        assert_eq!((odd.pieces(), odd.groups_of(2048)), (2049, 16384..16387), "a short last piece");
        assert_eq!(odd.pieces_touching(7..9), 0..2);
        assert_eq!(odd.pieces_touching(8..9), 1..2);
    }

    #[test]
    fn ranges_round_trip() {
        let mut set = PieceSet::empty(200);
        for p in [0, 1, 2, 5, 63, 64, 65, 199] {
            set.insert(p);
        }
        assert_eq!(set.to_ranges(), vec![0..3, 5..6, 63..66, 199..200]);
        assert_eq!(PieceSet::from_ranges(200, &set.to_ranges()), set);
        assert_eq!(set.count(), 8);
        let outside = PieceSet::from_ranges(10, &[5..50, 60..70]);
        assert_eq!(outside.to_ranges(), vec![5..10]);
        assert!(PieceSet::full(70).is_full());
        assert_eq!(set.missing_word(3), 0x7f, "192..199 missing, 199 held, 200.. past the end");
        assert!(set.remove(64) && !set.remove(64));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 63, 65, 199]);
        assert_eq!(set.count(), 7);
    }

    fn on_the_wire(set: &PieceSet) -> (String, PieceSet) {
        let json = serde_json::to_string(&HaveMap::from(set)).expect("encodes");
        let back: HaveMap = serde_json::from_str(&json).expect("decodes");
        (json, back.to_set(set.len()))
    }

    #[test]
    fn a_have_map_travels_as_ranges_or_bits_whichever_is_shorter() {
        let mut runs = PieceSet::empty(4096);
        runs.insert_range(0..1000);
        runs.insert_range(3000..4096);
        let (json, back) = on_the_wire(&runs);
        assert_eq!(json, r#"{"pieces":4096,"ranges":[[0,1000],[3000,4096]]}"#);
        assert_eq!(back, runs);

        // Every third of 203 pieces (not a whole number of bytes): 68 ranges, 26 bytes.
        let mut scattered = PieceSet::empty(203);
        (0..203).step_by(3).for_each(|p| _ = scattered.insert(p));
        let (json, back) = on_the_wire(&scattered);
        assert!(json.contains(r#""bits":"49922449922449"#), "{json}");
        assert!(!json.contains("ranges"), "{json}");
        assert_eq!(back, scattered);
        let as_ranges = serde_json::to_string(&HaveMap::from(&scattered).ranges).expect("json");
        assert!(json.len() < as_ranges.len() + r#"{"pieces":203,"ranges":}"#.len(), "{as_ranges}");

        for set in [PieceSet::empty(0), PieceSet::empty(9), PieceSet::full(9), PieceSet::full(4097)]
        {
            assert_eq!(on_the_wire(&set).1, set);
        }
    }

    #[test]
    fn a_bitmap_that_does_not_fit_its_piece_count_is_refused() {
        let refused = |json: &str| serde_json::from_str::<HaveMap>(json).is_err();
        assert!(!refused(r#"{"pieces":9,"bits":"ff01"}"#));
        assert!(refused(r#"{"pieces":9,"bits":"ff"}"#), "too short");
        assert!(refused(r#"{"pieces":9,"bits":"ff0100"}"#), "too long");
        assert!(refused(r#"{"pieces":9,"bits":"+f01"}"#), "a sign is not a digit");
        assert!(refused(r#"{"pieces":9,"bits":"ffé"}"#), "not ASCII");
        assert!(refused(r#"{"pieces":1099511627776,"bits":""}"#), "a huge count allocates nothing");
        // Bits past the count (in the last byte) are ignored, as ranges past it are.
        let map: HaveMap = serde_json::from_str(r#"{"pieces":9,"bits":"00ff"}"#).expect("decodes");
        assert_eq!(map.ranges, vec![(8, 9)]);
    }

    proptest::proptest! {
        #[test]
        fn any_have_map_survives_the_wire(pieces in 0u64..600, seed in proptest::collection::vec(0u64..600, 0..300)) {
            let mut set = PieceSet::empty(pieces);
            seed.iter().filter(|&&p| p < pieces).for_each(|&p| _ = set.insert(p));
            proptest::prop_assert_eq!(on_the_wire(&set).1, set);
        }
    }
}
