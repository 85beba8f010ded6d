//! The trainer's parameters as the runtime syncs them: named flat tensors of any floating
//! type (f32, f64, f16, bf16), as byte buffers the trainer owns the layout of. Sync rounds work
//! on an f32 view of all of them concatenated (registration order); results are written back
//! rounded to each tensor's type. The outer optimizer's anchors stay in f32 (a master copy), so
//! a low-precision model does not accumulate rounding in its outer steps.

use phalanx_collectives::reduce::{element_f64, set_element_f64, DType};
use thiserror::Error;

/// Why a tensor cannot be registered.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamError {
    /// Only floating types are synced.
    #[error("tensor {name:?}: {dtype:?} is not a floating type (f32, f64, f16, bf16)")]
    NotFloating {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: DType,
    },
    /// The bytes are not whole elements.
    #[error("tensor {name:?}: {len} bytes are not whole {dtype:?} elements")]
    Ragged {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: DType,
        /// Its length in bytes.
        len: usize,
    },
    /// Two tensors with one name.
    #[error("tensor {0:?} is registered twice")]
    Duplicate(String),
}

/// One registered tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Its name (unique).
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its elements, little endian.
    pub bytes: Vec<u8>,
}

/// The registered tensors, in registration order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamSet {
    tensors: Vec<Tensor>,
}

impl ParamSet {
    /// No tensors.
    pub fn new() -> ParamSet {
        ParamSet::default()
    }

    /// Registers a tensor (appended to the f32 view).
    pub fn register(&mut self, name: &str, dtype: DType, bytes: Vec<u8>) -> Result<(), ParamError> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            return Err(ParamError::NotFloating { name: name.into(), dtype });
        }
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(ParamError::Ragged { name: name.into(), dtype, len: bytes.len() });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(ParamError::Duplicate(name.into()));
        }
        self.tensors.push(Tensor { name: name.into(), dtype, bytes });
        Ok(())
    }

    /// The tensors.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// A tensor's bytes, for the trainer to read or update in place.
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut Vec<u8>> {
        self.tensors.iter_mut().find(|t| t.name == name).map(|t| &mut t.bytes)
    }

    /// Elements in all tensors.
    pub fn len(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes.len() / t.dtype.size()).sum()
    }

    /// Whether no elements are registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All elements as f32, tensors concatenated in registration order.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        for t in &self.tensors {
            if t.dtype == DType::F32 {
                out.extend(t.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            } else {
                let n = t.bytes.len() / t.dtype.size();
                out.extend((0..n).map(|i| element_f64(t.dtype, &t.bytes, i) as f32));
            }
        }
        out
    }

    /// Writes `flat` (as [`ParamSet::to_f32`] lays it out) back into the tensors, each element
    /// rounded to its tensor's type. Extra values are ignored; missing ones leave the rest.
    pub fn set_from_f32(&mut self, flat: &[f32]) {
        let mut at = 0;
        for t in &mut self.tensors {
            let n = t.bytes.len() / t.dtype.size();
            let Some(src) = flat.get(at..at + n) else { return };
            if t.dtype == DType::F32 {
                for (c, v) in t.bytes.chunks_exact_mut(4).zip(src) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            } else {
                for (i, v) in src.iter().enumerate() {
                    set_element_f64(t.dtype, &mut t.bytes, i, f64::from(*v));
                }
            }
            at += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_of_several_types_round_trip_through_the_f32_view() {
        let mut p = ParamSet::new();
        p.register("w", DType::F32, [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect()).expect("f32");
        p.register("b", DType::BF16, [half::bf16::from_f32(0.25)].iter().flat_map(|v| v.to_le_bytes()).collect())
            .expect("bf16");
        p.register("h", DType::F16, [half::f16::from_f32(3.0)].iter().flat_map(|v| v.to_le_bytes()).collect())
            .expect("f16");
        assert_eq!(p.len(), 4);
        assert_eq!(p.to_f32(), vec![1.5, -2.0, 0.25, 3.0]);
        p.set_from_f32(&[0.5, 0.75, 1.0 / 3.0, 65504.0]);
        let back = p.to_f32();
        assert_eq!(&back[..2], &[0.5, 0.75]);
        assert_eq!(back[2], half::bf16::from_f32(1.0 / 3.0).to_f32(), "rounded to bf16");
        assert_eq!(back[3], 65504.0);
    }

    #[test]
    fn bad_registrations_are_named() {
        let mut p = ParamSet::new();
        assert!(matches!(p.register("i", DType::I32, vec![0; 4]), Err(ParamError::NotFloating { .. })));
        assert!(matches!(p.register("r", DType::F32, vec![0; 5]), Err(ParamError::Ragged { len: 5, .. })));
        p.register("x", DType::F64, vec![0; 8]).expect("f64");
        assert_eq!(p.register("x", DType::F64, vec![0; 8]), Err(ParamError::Duplicate("x".into())));
    }
}
