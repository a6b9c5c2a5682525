//! Each sequence's keys and values, per layer, in host memory laid out
//! position by position (`[positions, kv_heads, head_dim]`), so that
//! appending a decode token is one `extend` of its values (amortised
//! doubling, no copy of the rest) and the decode kernel reads them in
//! place. Prompt chunks, which attend through candle, view them as
//! tensors.

use candle_core::{Device, Tensor};

/// The KV cache of one sequence. Dropping it frees its memory, which is how
/// a finished or cancelled sequence gives its share back.
pub struct SequenceCache {
    /// Per layer: keys, then values.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Floats per position: kv_heads * head_dim.
    position_width: usize,
    /// Positions filled in every layer.
    len: usize,
}

impl SequenceCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| (Vec::new(), Vec::new())).collect(),
            position_width: kv_heads * head_dim,
            len: 0,
        }
    }

    /// Positions already cached: where the next token goes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the keys and values of new positions (`[n, kv_heads,
    /// head_dim]`, flattened) at position `self.len()` of `layer`. Call
    /// [`SequenceCache::advance`] once every layer has appended.
    pub fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let (cached_keys, cached_values) = &mut self.layers[layer];
        // A failed step may have left positions past `len`: overwrite them.
        cached_keys.truncate(self.len * self.position_width);
        cached_values.truncate(self.len * self.position_width);
        cached_keys.extend_from_slice(keys);
        cached_values.extend_from_slice(values);
    }

    /// Every position of `layer` appended so far (`[positions, kv_heads,
    /// head_dim]` flattened): keys, then values.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (keys, values) = &self.layers[layer];
        (keys, values)
    }

    /// `layer`'s keys and values as `[kv_heads, positions, head_dim]`
    /// tensors on `device`, for attention through candle.
    pub fn tensors(
        &self,
        layer: usize,
        kv_heads: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (keys, values) = self.layer(layer);
        let positions = keys.len() / self.position_width;
        let head_dim = self.position_width / kv_heads;
        let view = |data: &[f32]| {
            Tensor::from_slice(data, (positions, kv_heads, head_dim), device)?
                .transpose(0, 1)?
                .contiguous()
        };
        Ok((view(keys)?, view(values)?))
    }

    /// Marks `n` more positions as filled once every layer has appended them.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_keep_every_position_in_order() {
        let mut cache = SequenceCache::new(2, 2, 3);
        let mut expected = Vec::new();
        for step in 0..40u32 {
            let n = if step == 0 { 5 } else { 1 };
            let values: Vec<f32> = (0..n * 6).map(|i| (step * 100 + i as u32) as f32).collect();
            expected.extend(values.iter().copied());
            for layer in 0..2 {
                cache.append(layer, &values, &values);
            }
            cache.advance(n);
            let (keys, vals) = cache.layer(1);
            assert_eq!(keys, expected.as_slice());
            assert_eq!(vals, expected.as_slice());
        }
        assert_eq!(cache.len(), 44);
        let (keys, _) = cache.tensors(0, 2, &Device::Cpu).unwrap();
        assert_eq!(keys.dims(), &[2, 44, 3]);
        // kv head 1 of position 0 is the second triple of the first step.
        assert_eq!(
            keys.get(1)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![3.0, 4.0, 5.0]
        );
    }

    #[test]
    fn a_failed_step_leaves_nothing_behind() {
        let mut cache = SequenceCache::new(1, 1, 1);
        cache.append(0, &[1.0], &[1.0]);
        cache.advance(1);
        // A step appends position 1, fails before `advance`, then retries.
        cache.append(0, &[9.0], &[9.0]);
        cache.append(0, &[2.0], &[2.0]);
        cache.advance(1);
        assert_eq!(cache.layer(0).0, &[1.0, 2.0]);
    }
}
