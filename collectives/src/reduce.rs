//! Element types and reduction kernels over little-endian host buffers.

use half::{bf16, f16};

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Two's-complement 32-bit integer.
    I32,
    /// Two's-complement 64-bit integer.
    I64,
    /// Unsigned byte (raw bytes: broadcast, all-gather of opaque data; reductions wrap).
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Every numeric type a trainer reduces, for tests and sweeps (not [`DType::U8`]).
    pub const ALL: [DType; 6] = [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64];
}

/// Reduction operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum (integers wrap on overflow, like NCCL and MPI).
    Sum,
    /// Sum divided by the number of participants at the end (integers: truncated toward zero).
    Avg,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Product (integers wrap on overflow).
    Prod,
}

impl ReduceOp {
    /// Every operator, for tests and sweeps.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max, ReduceOp::Prod];
}

macro_rules! combine_chunks {
    ($dst:expr, $src:expr, $t:ty, $n:expr, $f:expr) => {{
        for (d, s) in $dst.chunks_exact_mut($n).zip($src.chunks_exact($n)) {
            let a = <$t>::from_le_bytes(d.try_into().expect("chunk size"));
            let b = <$t>::from_le_bytes(s.try_into().expect("chunk size"));
            let f: fn($t, $t) -> $t = $f;
            d.copy_from_slice(&f(a, b).to_le_bytes());
        }
    }};
}

macro_rules! by_op {
    ($dst:expr, $src:expr, $op:expr, $t:ty, $n:expr, add: $add:expr, mul: $mul:expr, min: $min:expr, max: $max:expr) => {
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => combine_chunks!($dst, $src, $t, $n, $add),
            ReduceOp::Prod => combine_chunks!($dst, $src, $t, $n, $mul),
            ReduceOp::Min => combine_chunks!($dst, $src, $t, $n, $min),
            ReduceOp::Max => combine_chunks!($dst, $src, $t, $n, $max),
        }
    };
}

/// `dst[i] = dst[i] ⊕ src[i]` elementwise. Both slices hold whole elements of `dtype` and have
/// the same length (checked). Floating min/max propagate NaN.
pub fn reduce_into(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "reduce over buffers of different lengths");
    assert_eq!(dst.len() % dtype.size(), 0, "buffer is not whole elements");
    fn fmin<T: PartialOrd + Copy>(a: T, b: T, nan: fn(T) -> bool) -> T {
        if nan(a) || nan(b) {
            if nan(a) {
                a
            } else {
                b
            }
        } else if b < a {
            b
        } else {
            a
        }
    }
    fn fmax<T: PartialOrd + Copy>(a: T, b: T, nan: fn(T) -> bool) -> T {
        if nan(a) || nan(b) {
            if nan(a) {
                a
            } else {
                b
            }
        } else if b > a {
            b
        } else {
            a
        }
    }
    match dtype {
        DType::F32 => by_op!(dst, src, op, f32, 4, add: |a, b| a + b, mul: |a, b| a * b,
            min: |a, b| fmin(a, b, f32::is_nan), max: |a, b| fmax(a, b, f32::is_nan)),
        DType::F64 => by_op!(dst, src, op, f64, 8, add: |a, b| a + b, mul: |a, b| a * b,
            min: |a, b| fmin(a, b, f64::is_nan), max: |a, b| fmax(a, b, f64::is_nan)),
        DType::F16 => by_op!(dst, src, op, f16, 2, add: |a, b| a + b, mul: |a, b| a * b,
            min: |a, b| fmin(a, b, f16::is_nan), max: |a, b| fmax(a, b, f16::is_nan)),
        DType::BF16 => by_op!(dst, src, op, bf16, 2, add: |a, b| a + b, mul: |a, b| a * b,
            min: |a, b| fmin(a, b, bf16::is_nan), max: |a, b| fmax(a, b, bf16::is_nan)),
        DType::I32 => by_op!(dst, src, op, i32, 4, add: |a, b| a.wrapping_add(b), mul: |a, b| a.wrapping_mul(b),
            min: |a, b| a.min(b), max: |a, b| a.max(b)),
        DType::I64 => by_op!(dst, src, op, i64, 8, add: |a, b| a.wrapping_add(b), mul: |a, b| a.wrapping_mul(b),
            min: |a, b| a.min(b), max: |a, b| a.max(b)),
        DType::U8 => by_op!(dst, src, op, u8, 1, add: |a, b| a.wrapping_add(b), mul: |a, b| a.wrapping_mul(b),
            min: |a, b| a.min(b), max: |a, b| a.max(b)),
    }
}

/// Divides every element by `divisor` (the last step of [`ReduceOp::Avg`]).
pub fn divide(dtype: DType, buf: &mut [u8], divisor: usize) {
    macro_rules! each {
        ($t:ty, $n:expr, $f:expr) => {
            for c in buf.chunks_exact_mut($n) {
                let v = <$t>::from_le_bytes((&*c).try_into().expect("chunk size"));
                let f = |v: $t| -> $t { $f(v) };
                c.copy_from_slice(&f(v).to_le_bytes());
            }
        };
    }
    let d = divisor.max(1);
    match dtype {
        DType::F32 => each!(f32, 4, |v| v / d as f32),
        DType::F64 => each!(f64, 8, |v| v / d as f64),
        DType::F16 => each!(f16, 2, |v: f16| f16::from_f32(v.to_f32() / d as f32)),
        DType::BF16 => each!(bf16, 2, |v: bf16| bf16::from_f32(v.to_f32() / d as f32)),
        DType::I32 => each!(i32, 4, |v| v / d as i32),
        DType::I64 => each!(i64, 8, |v| v / d as i64),
        DType::U8 => each!(u8, 1, |v| (v as usize / d) as u8),
    }
}

/// Reads element `i` of a buffer as f64 (for references and tolerance checks).
pub fn element_f64(dtype: DType, buf: &[u8], i: usize) -> f64 {
    let s = &buf[i * dtype.size()..(i + 1) * dtype.size()];
    match dtype {
        DType::F32 => f32::from_le_bytes(s.try_into().expect("4 bytes")) as f64,
        DType::F64 => f64::from_le_bytes(s.try_into().expect("8 bytes")),
        DType::F16 => f16::from_le_bytes(s.try_into().expect("2 bytes")).to_f64(),
        DType::BF16 => bf16::from_le_bytes(s.try_into().expect("2 bytes")).to_f64(),
        DType::I32 => i32::from_le_bytes(s.try_into().expect("4 bytes")) as f64,
        DType::I64 => i64::from_le_bytes(s.try_into().expect("8 bytes")) as f64,
        DType::U8 => s[0] as f64,
    }
}

/// Writes `v` as element `i` (rounded to the type).
pub fn set_element_f64(dtype: DType, buf: &mut [u8], i: usize, v: f64) {
    let s = &mut buf[i * dtype.size()..(i + 1) * dtype.size()];
    match dtype {
        DType::F32 => s.copy_from_slice(&(v as f32).to_le_bytes()),
        DType::F64 => s.copy_from_slice(&v.to_le_bytes()),
        DType::F16 => s.copy_from_slice(&f16::from_f64(v).to_le_bytes()),
        DType::BF16 => s.copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
        DType::I32 => s.copy_from_slice(&(v as i32).to_le_bytes()),
        DType::I64 => s.copy_from_slice(&(v as i64).to_le_bytes()),
        DType::U8 => s[0] = v as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(dtype: DType, vals: &[f64]) -> Vec<u8> {
        let mut b = vec![0u8; vals.len() * dtype.size()];
        for (i, v) in vals.iter().enumerate() {
            set_element_f64(dtype, &mut b, i, *v);
        }
        b
    }

    #[test]
    fn every_op_on_every_type_matches_the_closed_form() {
        for dtype in DType::ALL {
            let a = [3.0, -2.0, 5.0];
            let b = [4.0, 7.0, -1.0];
            for (op, want) in [
                (ReduceOp::Sum, [7.0, 5.0, 4.0]),
                (ReduceOp::Prod, [12.0, -14.0, -5.0]),
                (ReduceOp::Min, [3.0, -2.0, -1.0]),
                (ReduceOp::Max, [4.0, 7.0, 5.0]),
            ] {
                let mut d = buf(dtype, &a);
                reduce_into(dtype, op, &mut d, &buf(dtype, &b));
                let got: Vec<f64> = (0..3).map(|i| element_f64(dtype, &d, i)).collect();
                assert_eq!(got, want, "{dtype:?} {op:?}");
            }
            let mut d = buf(dtype, &[8.0, -6.0]);
            divide(dtype, &mut d, 4);
            assert_eq!(element_f64(dtype, &d, 0), 2.0);
            assert_eq!(element_f64(dtype, &d, 1), if matches!(dtype, DType::I32 | DType::I64) { -1.0 } else { -1.5 });
        }
    }

    #[test]
    fn bytes_wrap_and_truncate() {
        let mut d = vec![250u8, 3, 7];
        reduce_into(DType::U8, ReduceOp::Sum, &mut d, &[10, 4, 0]);
        assert_eq!(d, vec![4, 7, 7]);
        reduce_into(DType::U8, ReduceOp::Max, &mut d, &[5, 1, 9]);
        assert_eq!(d, vec![5, 7, 9]);
        divide(DType::U8, &mut d, 2);
        assert_eq!(d, vec![2, 3, 4]);
    }

    #[test]
    fn float_min_and_max_propagate_nan() {
        let mut d = buf(DType::F32, &[f64::NAN, 1.0]);
        reduce_into(DType::F32, ReduceOp::Min, &mut d, &buf(DType::F32, &[0.0, f64::NAN]));
        assert!(element_f64(DType::F32, &d, 0).is_nan());
        assert!(element_f64(DType::F32, &d, 1).is_nan());
    }
}
