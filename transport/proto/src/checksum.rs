//! CRC32C (Castagnoli), the checksum of every frame, computed with the SIMD-accelerated
//! `crc-fast` crate (measured here: 38 GB/s on cache-hot data against 22 GB/s for the
//! `crc32c` crate; see docs/performance.md).

use crc_fast::{CrcAlgorithm, Digest};

/// An incremental CRC32C.
pub struct Crc32c(Digest);

impl Crc32c {
    /// A fresh checksum.
    pub fn new() -> Crc32c {
        Crc32c(Digest::new(CrcAlgorithm::Crc32Iscsi))
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The checksum of everything fed so far.
    pub fn finish(&self) -> u32 {
        self.0.finalize() as u32
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c::new()
    }
}

/// CRC32C of `a` followed by `b`, from CRC32C of `a`, CRC32C of `b` and the length of `b`
/// (no pass over the bytes).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    crc_fast::checksum_combine(CrcAlgorithm::Crc32Iscsi, u64::from(crc_a), u64::from(crc_b), len_b as u64) as u32
}

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, data) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_value_and_the_reference_crate() {
        // The CRC32C check value from the CRC catalogue: crc("123456789") = 0xE3069283.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        assert_eq!(crc32c(&data), ::crc32c::crc32c(&data));
        let mut inc = Crc32c::new();
        inc.update(&data[..777]);
        inc.update(&data[777..]);
        assert_eq!(inc.finish(), crc32c(&data));
        for split in [0, 1, 48, 777, data.len()] {
            let (a, b) = data.split_at(split);
            assert_eq!(crc32c_combine(crc32c(a), crc32c(b), b.len()), crc32c(&data), "split at {split}");
        }
    }
}
