//! A seeded generator for fuzzing: xorshift64*, small, fast and deterministic, so a failure
//! reproduces from its seed.
pub struct Random(pub u64);

impl Random {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.next_u64() as u8)
    }

    /// `frame` with up to four bytes overwritten and, half the time, cut short to no less
    /// than `min_len`.
    pub fn mutate(&mut self, frame: &[u8], min_len: usize) -> Vec<u8> {
        let mut mutated = frame.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(mutated.len());
            mutated[at] = self.next_u64() as u8;
        }
        if self.below(2) == 0 {
            mutated.truncate(min_len + self.below(mutated.len() - min_len + 1));
        }
        mutated
    }
}
