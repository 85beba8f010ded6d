//! Copying received data into a large buffer with streaming (non-temporal) stores.
//!
//! A plain copy into memory that is not in the cache first reads each destination line in (to
//! own it), then writes it, and evicts other data to make room. Streaming stores write whole
//! lines around the cache: no read of the destination, no eviction. For data the collective
//! does not read again — a received all-gather block, once its forwarding send holds the
//! received buffer itself — that is pure gain: measured 1.4–1.6× faster than `memcpy` for 1 MiB
//! pieces into a 64 MiB buffer on the benchmark VM (docs/performance.md). For data read soon
//! after it is a loss (the read must go to memory), so the executor streams only receives
//! nothing reads later, and only into buffers larger than the caches ([`STREAMING_MIN`]).

/// Buffers from this many bytes on have their unread receives copied with streaming stores
/// (smaller ones may stay in the cache for the caller, which a streaming copy would prevent).
pub const STREAMING_MIN: usize = 8 << 20;

/// Copies `src` into `dst` (equal lengths) with streaming stores where the CPU has them
/// (x86-64, whose baseline SSE2 does), else as `copy_from_slice`. The bytes are in `dst` when
/// it returns, as with any copy (the stores are fenced). Panics if the lengths differ.
pub fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "streaming copy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        let n = dst.len();
        // Unaligned head and the tail past the last whole 64 bytes: plain copies.
        let head = dst.as_ptr().align_offset(16).min(n);
        let body = (n - head) / 64 * 64;
        dst[..head].copy_from_slice(&src[..head]);
        // SAFETY: SSE2 is part of the x86-64 baseline; `head..head + body` lies within both
        // slices (equal lengths, checked above), and `dst + head` is 16-byte aligned, as
        // `_mm_stream_si128` requires.
        unsafe { stream_sse2(dst[head..head + body].as_mut_ptr(), src[head..head + body].as_ptr(), body) };
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Streams `len` bytes (a multiple of 64) from `src` to the 16-byte-aligned `dst`, then fences
/// the stores so that they are ordered before anything the caller does next.
///
/// # Safety
/// `dst` and `src` must be valid for `len` bytes, not overlap, and `dst` must be 16-byte
/// aligned.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_sse2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let mut i = 0;
    while i < len {
        let s = src.add(i) as *const __m128i;
        let d = dst.add(i) as *mut __m128i;
        let (a, b, c, e) =
            (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)), _mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
        _mm_stream_si128(d, a);
        _mm_stream_si128(d.add(1), b);
        _mm_stream_si128(d.add(2), c);
        _mm_stream_si128(d.add(3), e);
        i += 64;
    }
    _mm_sfence();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any length and any alignment of either side: the same bytes as a plain copy, and
        /// nothing outside the destination touched.
        #[test]
        fn a_streaming_copy_equals_a_plain_copy(len in 0usize..700, dst_at in 0usize..64, src_at in 0usize..64) {
            let src: Vec<u8> = (0..len + src_at).map(|i| (i * 7 + 3) as u8).collect();
            let mut dst = vec![0xAAu8; len + dst_at + 64];
            copy(&mut dst[dst_at..dst_at + len], &src[src_at..]);
            prop_assert_eq!(&dst[dst_at..dst_at + len], &src[src_at..]);
            prop_assert!(dst[..dst_at].iter().chain(&dst[dst_at + len..]).all(|b| *b == 0xAA));
        }
    }
}
