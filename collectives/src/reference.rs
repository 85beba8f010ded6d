//! Naive references for checking collectives: deterministic inputs that are exact in every
//! data type, the expected reduction computed in f64, and the tolerance each type is held to.
//! Tests, `verify`-style checks and the simulator's small-scale runs use them.

use crate::reduce::{element_f64, set_element_f64, DType, ReduceOp};

/// Rank `rank`'s input of `count` elements for reduction `op`: small integers, exact in every
/// type (bf16 has 8 bits of mantissa). Products use only −1, 1 and a few 2s, so no type
/// overflows whatever the order of evaluation (an overflow to infinity times a zero is NaN in
/// one order and 0 in another).
pub fn input(dtype: DType, op: ReduceOp, rank: usize, count: usize) -> Vec<u8> {
    let mut b = vec![0u8; count * dtype.size()];
    for i in 0..count {
        let v = match op {
            ReduceOp::Prod => match (rank * 7 + i * 3) % 11 {
                0 => 2.0,
                k if k % 2 == 0 => -1.0,
                _ => 1.0,
            },
            _ => ((rank * 7 + i * 3) % 11) as f64 - 5.0,
        };
        set_element_f64(dtype, &mut b, i, v);
    }
    b
}

/// Element `i` of `op` over the [`input`]s of `ranks`, computed naively in f64 (integer
/// averages truncate, integer products wrap, as the kernels do).
pub fn expected(dtype: DType, op: ReduceOp, ranks: &[usize], count: usize, i: usize) -> f64 {
    let vals: Vec<f64> = ranks.iter().map(|r| element_f64(dtype, &input(dtype, op, *r, count), i)).collect();
    let n = ranks.len() as f64;
    match op {
        ReduceOp::Sum => vals.iter().sum(),
        ReduceOp::Avg => {
            let s: f64 = vals.iter().sum();
            if matches!(dtype, DType::I32 | DType::I64 | DType::U8) {
                (s / n).trunc()
            } else {
                s / n
            }
        }
        ReduceOp::Min => vals.iter().cloned().fold(f64::INFINITY, f64::min),
        ReduceOp::Max => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        ReduceOp::Prod => match dtype {
            DType::I32 => vals.iter().fold(1i32, |p, v| p.wrapping_mul(*v as i32)) as f64,
            DType::I64 => vals.iter().fold(1i64, |p, v| p.wrapping_mul(*v as i64)) as f64,
            _ => vals.iter().product(),
        },
    }
}

/// Relative tolerance per type: sums of up to 16 [`input`]s are exact in every type, so only
/// `Avg`'s final division rounds.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1e-2,
        DType::BF16 => 2e-2,
        DType::F32 => 1e-6,
        _ => 0.0,
    }
}

/// Whether `got` is `want` within `dtype`'s tolerance (integers: exactly).
pub fn close(dtype: DType, got: f64, want: f64) -> bool {
    if matches!(dtype, DType::I32 | DType::I64 | DType::U8) {
        got == want
    } else {
        (got - want).abs() <= tolerance(dtype) * want.abs().max(1.0)
    }
}
