//! SplitMix64 (Steele, Lea and Flood; Vigna's `splitmix64.c`), the one generator behind
//! every derived seed and dropout mask of a run. Its outputs are part of a run's
//! identity (`--resume` replays dropout masks bit-for-bit from seeds derived from
//! (seed, step, micro-batch)), so it is fixed here and never swapped for a library RNG.
//! `lora-datasets` keeps its own copy of the same algorithm in `datasets/src/rng.rs`
//! for shuffles and splits, because it does not depend on this crate.

/// The SplitMix64 increment (2^64 / golden ratio).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mix (Stafford's variant 13).
/// Also the finaliser that turns a combination of counters into a well-mixed seed.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The next value of the SplitMix64 stream whose state is `state`.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN_GAMMA);
    mix64(*state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_matches_the_reference_implementation() {
        // Vigna's splitmix64.c seeded with 0.
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
    }
}
