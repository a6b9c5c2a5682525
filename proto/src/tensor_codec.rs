//! Tensors on the wire: a dtype, a shape and the raw little-endian bytes.
//!
//! Two forms. Tensors: encoding is one copy of the tensor's memory into a
//! `Bytes`, decoding one copy out of it into candle's storage
//! (`Tensor::from_raw_buffer`). Row buffers (what the router's dispatch
//! gathers per expert): an f32 buffer becomes the message's bytes with no
//! copy at all (`Bytes::from_owner`), and decoding is one copy into an f32
//! buffer. No value is converted one by one unless the wire dtype differs
//! from the compute dtype, which is the point of offering bf16/f16 on the
//! wire.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};

use crate::v1;

/// Why a tensor from a peer was refused. Each message names what is wrong,
/// because it ends up in a gRPC status the peer's operator will read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("tensor is missing")]
    Missing,
    #[error("tensor dtype {0} is not one of f32, bf16, f16")]
    UnknownDType(i32),
    #[error("tensor shape {shape:?} must be [rows, {width}]")]
    Shape { shape: Vec<u64>, width: usize },
    #[error("tensor of shape {shape:?} and dtype {dtype} needs {expected} bytes, got {actual}")]
    ByteLength {
        shape: Vec<u64>,
        dtype: &'static str,
        expected: u64,
        actual: usize,
    },
    #[error("tensor math failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Element types a tensor may take on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDType {
    #[default]
    F32,
    BF16,
    F16,
}

impl WireDType {
    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::BF16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    fn proto(self) -> v1::DType {
        match self {
            Self::F32 => v1::DType::DtypeF32,
            Self::BF16 => v1::DType::DtypeBf16,
            Self::F16 => v1::DType::DtypeF16,
        }
    }

    fn from_proto(raw: i32) -> Result<Self, CodecError> {
        match v1::DType::try_from(raw) {
            Ok(v1::DType::DtypeF32) => Ok(Self::F32),
            Ok(v1::DType::DtypeBf16) => Ok(Self::BF16),
            Ok(v1::DType::DtypeF16) => Ok(Self::F16),
            _ => Err(CodecError::UnknownDType(raw)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
            Self::F16 => "f16",
        }
    }

    pub fn size_in_bytes(self) -> usize {
        self.candle().size_in_bytes()
    }
}

impl std::fmt::Display for WireDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::BF16),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "unknown wire dtype {other:?}: expected f32, bf16 or f16"
            )),
        }
    }
}

/// Encodes a tensor as `dtype` (converting it first when it differs),
/// keeping its shape.
pub fn encode(tensor: &Tensor, dtype: WireDType) -> Result<v1::Tensor, CodecError> {
    let shape = tensor.dims().iter().map(|&d| d as u64).collect();
    let flat = tensor.flatten_all()?;
    // From f32 (what every service computes in), one copy out of candle's
    // storage, then the row-buffer path: candle's own dtype conversion and
    // a second copy into `Bytes` cost far more than the one copy
    // (docs/decisions.md; `cargo bench -p moe-proto`).
    let data = match (flat.dtype(), dtype) {
        (DType::F32, _) => f32_bytes(flat.to_vec1::<f32>()?, dtype),
        (_, WireDType::F32) => bytes_of(&flat.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        (_, WireDType::BF16) => bytes_of(&flat.to_dtype(DType::BF16)?.to_vec1::<half::bf16>()?),
        (_, WireDType::F16) => bytes_of(&flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?),
    };
    Ok(v1::Tensor {
        dtype: dtype.proto() as i32,
        shape,
        data,
    })
}

fn bytes_of<T: bytemuck::Pod>(values: &[T]) -> Bytes {
    Bytes::copy_from_slice(bytemuck::cast_slice(values))
}

/// A buffer of plain values lent to `Bytes` as its bytes.
struct PodBytes<T>(Vec<T>);

impl<T: bytemuck::Pod> AsRef<[u8]> for PodBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

fn owned_bytes<T: bytemuck::Pod + Send + 'static>(values: Vec<T>) -> Bytes {
    Bytes::from_owner(PodBytes(values))
}

/// Encodes `values`, `[rows, width]` row-major, as `dtype`: as f32 the
/// buffer itself becomes the message's bytes.
pub fn encode_rows(values: Vec<f32>, width: usize, dtype: WireDType) -> v1::Tensor {
    let rows = values.len().checked_div(width).unwrap_or(0);
    v1::Tensor {
        dtype: dtype.proto() as i32,
        shape: vec![rows as u64, width as u64],
        data: f32_bytes(values, dtype),
    }
}

/// `values` as the bytes of `dtype`: as f32 the buffer itself.
fn f32_bytes(values: Vec<f32>, dtype: WireDType) -> Bytes {
    match dtype {
        WireDType::F32 => owned_bytes(values),
        WireDType::BF16 => owned_bytes(values.into_iter().map(half::bf16::from_f32).collect()),
        WireDType::F16 => owned_bytes(values.into_iter().map(half::f16::from_f32).collect()),
    }
}

/// Decodes a `[rows, width]` tensor into an f32 buffer (row-major), after
/// the same checks as [`decode_rows`]. Returns the row count too.
pub fn decode_rows_f32(
    message: Option<&v1::Tensor>,
    width: usize,
) -> Result<(Vec<f32>, usize), CodecError> {
    let (rows, dtype, message) = check_rows(message, width)?;
    // `Bytes` promises no alignment, so values are read, not reinterpreted.
    let values = match dtype {
        WireDType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&message.data),
        WireDType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(&message.data)
            .into_iter()
            .map(half::bf16::to_f32)
            .collect(),
        WireDType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&message.data)
            .into_iter()
            .map(half::f16::to_f32)
            .collect(),
    };
    Ok((values, rows))
}

/// Decodes a `[rows, width]` tensor into f32 on `device`, after checking its
/// dtype, rank, width and byte length. Returns the wire dtype too, so that a
/// server can reply in the dtype it was sent.
pub fn decode_rows(
    message: Option<&v1::Tensor>,
    width: usize,
    device: &Device,
) -> Result<(Tensor, WireDType), CodecError> {
    let (rows, dtype, message) = check_rows(message, width)?;
    let tensor = Tensor::from_raw_buffer(&message.data, dtype.candle(), &[rows, width], device)?
        .to_dtype(DType::F32)?;
    Ok((tensor, dtype))
}

/// Checks a `[rows, width]` tensor's dtype, rank, width and byte length;
/// returns its rows and dtype.
fn check_rows(
    message: Option<&v1::Tensor>,
    width: usize,
) -> Result<(usize, WireDType, &v1::Tensor), CodecError> {
    let message = message.ok_or(CodecError::Missing)?;
    let dtype = WireDType::from_proto(message.dtype)?;
    let shape_error = || CodecError::Shape {
        shape: message.shape.clone(),
        width,
    };
    let [rows, got_width] = message.shape[..] else {
        return Err(shape_error());
    };
    if got_width != width as u64 {
        return Err(shape_error());
    }
    let expected = rows
        .checked_mul(got_width)
        .and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64));
    if expected != Some(message.data.len() as u64) {
        return Err(CodecError::ByteLength {
            shape: message.shape.clone(),
            dtype: dtype.name(),
            expected: expected.unwrap_or(u64::MAX),
            actual: message.data.len(),
        });
    }
    Ok((rows as usize, dtype, message))
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, width: usize) -> Tensor {
        let values: Vec<f32> = (0..rows * width).map(|i| i as f32 * 0.25 - 3.0).collect();
        Tensor::from_vec(values, (rows, width), &Device::Cpu).unwrap()
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let tensor = sample(3, 8);
        let message = encode(&tensor, WireDType::F32).unwrap();
        assert_eq!(message.shape, vec![3, 8]);
        assert_eq!(message.data.len(), 3 * 8 * 4);
        let (back, dtype) = decode_rows(Some(&message), 8, &Device::Cpu).unwrap();
        assert_eq!(dtype, WireDType::F32);
        assert_eq!(
            back.to_vec2::<f32>().unwrap(),
            tensor.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn half_precision_round_trips_within_its_precision() {
        let tensor = sample(2, 4);
        for dtype in [WireDType::BF16, WireDType::F16] {
            let message = encode(&tensor, dtype).unwrap();
            assert_eq!(message.data.len(), 2 * 4 * 2);
            let (back, got) = decode_rows(Some(&message), 4, &Device::Cpu).unwrap();
            assert_eq!(got, dtype);
            let diff = (back - &tensor).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 0.02, "{dtype:?}");
        }
    }

    #[test]
    fn refuses_a_wrong_byte_length() {
        let mut message = encode(&sample(2, 4), WireDType::F32).unwrap();
        message.data = message.data.slice(..30);
        let err = decode_rows(Some(&message), 4, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("needs 32 bytes, got 30"), "{err}");
    }

    #[test]
    fn refuses_a_wrong_width_rank_or_dtype() {
        let message = encode(&sample(2, 4), WireDType::F32).unwrap();
        let err = decode_rows(Some(&message), 5, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("must be [rows, 5]"), "{err}");

        let mut flat = message.clone();
        flat.shape = vec![8];
        assert!(matches!(
            decode_rows(Some(&flat), 4, &Device::Cpu),
            Err(CodecError::Shape { .. })
        ));

        let mut unknown = message.clone();
        unknown.dtype = 42;
        let err = decode_rows(Some(&unknown), 4, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("dtype 42"), "{err}");

        let mut huge = message;
        huge.shape = vec![u64::MAX, 4];
        assert!(matches!(
            decode_rows(Some(&huge), 4, &Device::Cpu),
            Err(CodecError::ByteLength { .. })
        ));
    }

    #[test]
    fn row_buffers_round_trip_and_match_the_tensor_form() {
        let values: Vec<f32> = (0..3 * 8).map(|i| i as f32 * 0.25 - 3.0).collect();
        let message = encode_rows(values.clone(), 8, WireDType::F32);
        assert_eq!(message, encode(&sample(3, 8), WireDType::F32).unwrap());
        let (back, rows) = decode_rows_f32(Some(&message), 8).unwrap();
        assert_eq!((back, rows), (values.clone(), 3));

        let half = encode_rows(values.clone(), 8, WireDType::BF16);
        assert_eq!(half.data.len(), 3 * 8 * 2);
        let (back, _) = decode_rows_f32(Some(&half), 8).unwrap();
        assert!(back.iter().zip(&values).all(|(b, v)| (b - v).abs() < 0.02));

        let err = decode_rows_f32(Some(&message), 5).unwrap_err();
        assert!(err.to_string().contains("must be [rows, 5]"), "{err}");
    }

    /// Bytes sliced at an odd offset are still read correctly.
    #[test]
    fn unaligned_bytes_decode() {
        let values = [1.5f32, -2.25];
        let mut raw = vec![0u8];
        raw.extend_from_slice(bytemuck::cast_slice(&values));
        let message = v1::Tensor {
            dtype: v1::DType::DtypeF32 as i32,
            shape: vec![1, 2],
            data: Bytes::from(raw).slice(1..),
        };
        assert_eq!(decode_rows_f32(Some(&message), 2).unwrap().0, values);
    }
}
