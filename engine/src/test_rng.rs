//! A deterministic generator for unit tests' data (torch's global generator is shared by tests
//! running in parallel): Knuth's 64-bit LCG.

pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 31 bits.
    pub fn next_u32(&mut self) -> u32 {
        self.step();
        (self.0 >> 33) as u32
    }

    /// The next value in [-1, 1) (24 bits).
    pub fn next_unit(&mut self) -> f32 {
        self.step();
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values in [-1, 1).
    pub fn units(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_unit()).collect()
    }

    fn step(&mut self) {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
}
