//! Each sequence's keys and values, per layer, in buffers that grow by
//! doubling so that appending one decode token copies nothing but that token.

use candle_core::Tensor;

/// One layer's cache: `[kv_heads, capacity, head_dim]` buffers of which the
/// first `len` positions (of the owning [`SequenceCache`]) are filled.
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    capacity: usize,
}

/// The KV cache of one sequence. Dropping it frees its memory, which is how
/// a finished or cancelled sequence gives its share back.
pub struct SequenceCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions filled in every layer.
    len: usize,
}

/// Smallest buffer a sequence starts with, in positions.
const MIN_CAPACITY: usize = 16;

impl SequenceCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
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

    /// Appends `[kv_heads, n, head_dim]` keys and values at position
    /// `self.len()` of `layer`, and returns views of all cached positions
    /// of that layer, the new ones included. Call [`SequenceCache::advance`]
    /// once every layer has appended.
    pub fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (kv_heads, n, head_dim) = keys.dims3()?;
        let (len, needed) = (self.len, self.len + n);
        let slot = &mut self.layers[layer];
        if slot.as_ref().is_none_or(|cache| cache.capacity < needed) {
            let capacity = needed.next_power_of_two().max(MIN_CAPACITY);
            let grow = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let buffer =
                    Tensor::zeros((kv_heads, capacity, head_dim), keys.dtype(), keys.device())?;
                if let Some(old) = old.filter(|_| len > 0) {
                    buffer.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                Ok(buffer)
            };
            let old = slot.take();
            *slot = Some(LayerCache {
                keys: grow(old.as_ref().map(|c| &c.keys))?,
                values: grow(old.as_ref().map(|c| &c.values))?,
                capacity,
            });
        }
        let cache = slot.as_ref().expect("allocated above");
        cache.keys.slice_set(&keys.contiguous()?, 1, len)?;
        cache.values.slice_set(&values.contiguous()?, 1, len)?;
        Ok((
            cache.keys.narrow(1, 0, needed)?,
            cache.values.narrow(1, 0, needed)?,
        ))
    }

    /// `layer`'s key and value buffers (`[kv_heads, capacity, head_dim]`,
    /// contiguous) and their capacity, once anything was appended to it.
    pub(crate) fn buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor, usize)> {
        self.layers[layer]
            .as_ref()
            .map(|cache| (&cache.keys, &cache.values, cache.capacity))
    }

    /// Marks `n` more positions as filled once every layer has appended them.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn appends_across_growth_keep_every_position() {
        let device = Device::Cpu;
        let mut cache = SequenceCache::new(1);
        let mut expected = Vec::new();
        for step in 0..40u32 {
            let n = if step == 0 { 5 } else { 1 };
            let values: Vec<f32> = (0..n * 2).map(|i| (step * 100 + i as u32) as f32).collect();
            expected.extend(values.iter().copied());
            let new = Tensor::from_vec(values, (1, n, 2), &device).unwrap();
            let (keys, vals) = cache.append(0, &new, &new).unwrap();
            cache.advance(n);
            assert_eq!(keys.dims(), &[1, cache.len(), 2]);
            assert_eq!(
                keys.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected
            );
            assert_eq!(
                vals.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected
            );
        }
        assert_eq!(cache.len(), 44);
    }
}
