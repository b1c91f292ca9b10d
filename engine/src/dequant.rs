//! Dequantisation of GGUF tensor data to float32: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
//! and the K-quants Q2_K to Q8_K ([`crate::dequant_k`]), the block formats of llama.cpp's
//! `ggml-quants.c`. Other types (IQ formats and the like) are refused by name.

use half::{bf16, f16};

use crate::dequant_k;
use crate::gguf::GgmlType;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DequantError {
    #[error(
        "tensor `{tensor}` uses ggml type {ty:?}, which Tessera does not dequantise \
         (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
    )]
    Unsupported { tensor: String, ty: GgmlType },
    #[error(
        "tensor `{tensor}`: {numel} elements are not a whole number of {block}-element blocks"
    )]
    PartialBlock {
        tensor: String,
        numel: usize,
        block: usize,
    },
    #[error("tensor `{tensor}`: {found} bytes of data, expected {expected}")]
    Size {
        tensor: String,
        expected: usize,
        found: usize,
    },
}

/// Turns `numel` elements of type `ty` stored in `bytes` into float32 values.
pub fn dequantize(
    tensor: &str,
    ty: GgmlType,
    bytes: &[u8],
    numel: usize,
) -> Result<Vec<f32>, DequantError> {
    let (block, block_bytes) = match ty {
        GgmlType::F32 => (1, 4),
        GgmlType::F16 | GgmlType::BF16 => (1, 2),
        GgmlType::Q8_0 => (32, 34),
        GgmlType::Q4_0 => (32, 18),
        GgmlType::Q4_1 => (32, 20),
        GgmlType::Q5_0 => (32, 22),
        GgmlType::Q5_1 => (32, 24),
        GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q4K
        | GgmlType::Q5K
        | GgmlType::Q6K
        | GgmlType::Q8K => {
            let (block, bytes) = ty.block_layout().expect("K-quants have a layout");
            (block as usize, bytes as usize)
        }
        _ => {
            return Err(DequantError::Unsupported {
                tensor: tensor.to_string(),
                ty,
            })
        }
    };
    if !numel.is_multiple_of(block) {
        return Err(DequantError::PartialBlock {
            tensor: tensor.to_string(),
            numel,
            block,
        });
    }
    let expected = numel / block * block_bytes;
    if bytes.len() != expected {
        return Err(DequantError::Size {
            tensor: tensor.to_string(),
            expected,
            found: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(numel);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q5_0 => {
            for b in bytes.chunks_exact(22) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                out.extend(q5_values(&b[2..]).map(|q| (q as i32 - 16) as f32 * d));
            }
        }
        GgmlType::Q5_1 => {
            for b in bytes.chunks_exact(24) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                out.extend(q5_values(&b[4..]).map(|q| q as f32 * d + m));
            }
        }
        GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q4K
        | GgmlType::Q5K
        | GgmlType::Q6K
        | GgmlType::Q8K => {
            let block_fn: fn(&[u8], &mut Vec<f32>) = match ty {
                GgmlType::Q2K => dequant_k::q2_k,
                GgmlType::Q3K => dequant_k::q3_k,
                GgmlType::Q4K => dequant_k::q4_k,
                GgmlType::Q5K => dequant_k::q5_k,
                GgmlType::Q6K => dequant_k::q6_k,
                _ => dequant_k::q8_k,
            };
            for b in bytes.chunks_exact(block_bytes) {
                block_fn(b, &mut out);
            }
        }
        _ => unreachable!("checked above"),
    }
    Ok(out)
}

/// The 32 5-bit values (`0..32`, in order) of a Q5_0 / Q5_1 block from its `qh` (4 bytes: bit
/// `j` is the fifth bit of value `j`) and `qs` (16 bytes: value `j`'s low four bits in the low
/// nibble of byte `j`, value `16 + j`'s in the high nibble), as `ggml-quants.c` lays them out.
pub fn q5_values(block: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let qh = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    let qs = &block[4..20];
    (0..32).map(move |i| {
        let (low, high) = if i < 16 {
            (qs[i] & 0x0f, (qh >> i) & 1)
        } else {
            (qs[i - 16] >> 4, (qh >> i) & 1)
        };
        low | ((high as u8) << 4)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize("t", GgmlType::Q8_0, &b, 32).unwrap();
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        assert_eq!(v, want);
    }

    #[test]
    fn q4_0_low_nibbles_first() {
        let mut b = f16b(2.0).to_vec();
        // Element i (i < 16) is the low nibble of byte i, element 16 + i the high nibble.
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize("t", GgmlType::Q4_0, &b, 32).unwrap();
        for i in 0..16 {
            assert_eq!(v[i], (i as f32 - 8.0) * 2.0);
            assert_eq!(v[16 + i], ((15 - i) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q4_1_scale_and_min() {
        let mut b = f16b(0.25).to_vec();
        b.extend(f16b(-1.0));
        b.extend((0..16u8).map(|i| i | (i << 4)));
        let v = dequantize("t", GgmlType::Q4_1, &b, 32).unwrap();
        for i in 0..16 {
            assert_eq!(v[i], i as f32 * 0.25 - 1.0);
            assert_eq!(v[16 + i], i as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn f16_bf16_f32() {
        let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| f16b(x)).collect();
        assert_eq!(
            dequantize("t", GgmlType::F16, &b, 2).unwrap(),
            vec![1.5, -2.0]
        );
        let b: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(
            dequantize("t", GgmlType::BF16, &b, 2).unwrap(),
            vec![1.5, -2.0]
        );
        let b: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            dequantize("t", GgmlType::F32, &b, 2).unwrap(),
            vec![1.5, -2.0]
        );
    }

    #[test]
    fn errors_name_the_tensor() {
        let e = dequantize("blk.0.attn_q.weight", GgmlType::Other(16), &[0; 66], 256).unwrap_err();
        assert!(matches!(e, DequantError::Unsupported { .. }));
        assert!(e.to_string().contains("blk.0.attn_q.weight"), "{e}");
        let e = dequantize("x", GgmlType::Q8_0, &[0; 34], 16).unwrap_err();
        assert!(matches!(e, DequantError::PartialBlock { .. }));
        let e = dequantize("x", GgmlType::Q8_0, &[0; 33], 32).unwrap_err();
        assert!(matches!(e, DequantError::Size { .. }), "{e}");
    }
}
