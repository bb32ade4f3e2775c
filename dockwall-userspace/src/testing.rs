//! The seeded generator of the randomized tests: the unit tests here, the
//! kernel and nftables tests in `tests/`. xorshift64*, the same as the
//! model-based test's in xtask (a separate crate that does not link this
//! one), so a seed means one sequence everywhere and a failing seed replays.
//! Not for anything but tests: it is not random in any other sense.

/// A seeded xorshift64* sequence.
pub struct Rng(u64);

impl Rng {
    /// A sequence from `seed` (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// An index into something of `len` items (len > 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}
