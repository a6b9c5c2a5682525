//! Property tests: whatever a peer puts in a Tensor message, decoding gives
//! an error or a tensor of the checked shape, never a panic.

use bytes::Bytes;
use candle_core::Device;
use proptest::prelude::*;

use super::*;

/// Dims that are mostly small and sometimes at the edges of u64.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..8,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2 + 1),
        1 => Just(1u64 << 32),
        1 => any::<u64>(),
    ]
}

/// A message as a peer could send it: any dtype number, any shape, any
/// bytes; half of them with a byte length that fits the shape.
fn message() -> impl Strategy<Value = (v1::Tensor, usize)> {
    (
        prop_oneof![4 => 0i32..5, 1 => any::<i32>()],
        prop::collection::vec(dim(), 0..4),
        prop::collection::vec(any::<u8>(), 0..192),
        1usize..8,
        any::<bool>(),
    )
        .prop_map(|(dtype, mut shape, mut data, width, fit)| {
            if fit && shape.len() == 2 {
                shape[1] = width as u64;
                shape[0] %= 8;
                let elem = WireDType::from_proto(dtype).map_or(4, |d| d.size_in_bytes());
                data.resize(shape[0] as usize * width * elem, 7);
            }
            let tensor = v1::Tensor {
                dtype,
                shape,
                data: Bytes::from(data),
            };
            (tensor, width)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_any_message_is_an_error_or_a_checked_tensor((message, width) in message()) {
        match decode_rows_f32(Some(&message), width) {
            Ok((values, rows)) => {
                prop_assert_eq!(message.shape.clone(), vec![rows as u64, width as u64]);
                prop_assert_eq!(values.len(), rows * width);
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
        match decode_rows(Some(&message), width, &Device::Cpu) {
            Ok((tensor, dtype)) => {
                prop_assert_eq!(tensor.dims(), &[message.shape[0] as usize, width][..]);
                prop_assert_eq!(dtype.proto() as i32, message.dtype);
                // What decodes encodes back to the same bytes (f32 exactly,
                // the halves through f32 without loss).
                let encoded = encode(&tensor, dtype).expect("a decoded tensor encodes");
                prop_assert_eq!(encoded.shape, message.shape.clone());
                prop_assert_eq!(encoded.data.len(), message.data.len());
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }
}
