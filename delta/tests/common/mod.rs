//! What the delta tests share.
#![allow(unreachable_pub)]

/// `len` bytes that do not repeat (xorshift from `seed`), as compressed images look.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
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
