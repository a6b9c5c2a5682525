//! A Hugging Face checkpoint directory: config.json, one or several
//! safetensors files, tokenizer.json.
//!
//! Opening a checkpoint memory-maps its files and reads only their headers;
//! tensor data is touched when a process loads the tensors it owns, so an
//! expert service never pages in another expert's weights.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::layout::TensorSpec;
use crate::{ModelConfig, ModelError, layout};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// How many leading bytes of the embedding table go into the fingerprint:
/// enough to tell two random initialisations apart, one page to read.
const FINGERPRINT_SAMPLE_BYTES: usize = 4096;

pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    weights: MmapedSafetensors,
    fingerprint: String,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let files = weight_files(dir)?;
        // SAFETY: the files are mapped read-only; like every safetensors
        // reader we rely on nobody truncating a checkpoint while it is served.
        let weights = unsafe { MmapedSafetensors::multi(&files)? };
        let fingerprint = fingerprint(&config, &weights)?;
        Ok(Self {
            dir: dir.to_owned(),
            config,
            weights,
            fingerprint,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Identifies this checkpoint across processes: a hash of the config, of
    /// every tensor's name, dtype and shape, and of the first bytes of the
    /// embedding table. Cheap to compute (headers and one page), and two
    /// processes agree on it only if they read the same checkpoint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Checks that every tensor in `specs` exists with its expected shape,
    /// naming the first that does not. Run at start, before loading.
    pub fn verify(&self, specs: &[TensorSpec]) -> Result<(), ModelError> {
        for spec in specs {
            let view = self
                .weights
                .get(&spec.name)
                .map_err(|_| ModelError::MissingTensor {
                    name: spec.name.clone(),
                })?;
            if view.shape() != spec.shape.as_slice() {
                return Err(ModelError::TensorShape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    actual: view.shape().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Loads one tensor as f32 on `device`. Call [`Checkpoint::verify`] first.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, ModelError> {
        self.load_as(name, device, DType::F32)
    }

    /// Loads one tensor as `dtype` on `device`. Call [`Checkpoint::verify`]
    /// first.
    pub fn load_as(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor, ModelError> {
        let tensor = self
            .weights
            .load(name, device)
            .map_err(|_| ModelError::MissingTensor {
                name: name.to_owned(),
            })?;
        Ok(tensor.to_dtype(dtype)?)
    }

    /// Loads a `[out, in]` weight matrix as `[in, out]`, contiguous, so that
    /// `x.matmul(w)` reads it in order: on CPU, candle's gemm gathers every
    /// column of a transposed view on each call, several times slower at
    /// decode's few rows (docs/decisions.md).
    pub fn load_transposed(&self, name: &str, device: &Device) -> Result<Tensor, ModelError> {
        self.load_transposed_as(name, device, DType::F32)
    }

    /// [`Checkpoint::load_transposed`] as `dtype`.
    pub fn load_transposed_as(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        Ok(self.load_as(name, device, dtype)?.t()?.contiguous()?)
    }

    /// The LM head, which is the embedding table when the two are tied.
    pub fn lm_head_name(&self) -> String {
        if self.config.tie_word_embeddings {
            layout::embed_tokens()
        } else {
            layout::lm_head()
        }
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER_FILE)
    }
}

/// The safetensors files of a checkpoint: the single file, or every shard the
/// index names (each once, in a stable order).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        return Err(ModelError::NoWeights {
            dir: dir.to_owned(),
        });
    }
    let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
        path: index_path.clone(),
        source,
    })?;
    let index_error = |message: String| ModelError::Index {
        path: index_path.clone(),
        message,
    };
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| index_error(err.to_string()))?;
    let weight_map: HashMap<String, String> =
        serde_json::from_value(index["weight_map"].clone())
            .map_err(|err| index_error(format!("weight_map: {err}")))?;
    let shards: BTreeSet<&String> = weight_map.values().collect();
    shards
        .into_iter()
        .map(|shard| {
            let path = dir.join(shard);
            if path.is_file() {
                Ok(path)
            } else {
                Err(index_error(format!("shard {shard} does not exist")))
            }
        })
        .collect()
}

fn fingerprint(config: &ModelConfig, weights: &MmapedSafetensors) -> Result<String, ModelError> {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(config).expect("a config always serialises"));
    let mut tensors = weights.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &tensors {
        hasher.update(format!("{name}:{:?}:{:?};", view.dtype(), view.shape()));
    }
    if let Ok(embed) = weights.get(&layout::embed_tokens()) {
        let data = embed.data();
        hasher.update(&data[..data.len().min(FINGERPRINT_SAMPLE_BYTES)]);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::synth::{Preset, write_checkpoint};

    /// Rewrites a checkpoint's weights through `edit`.
    fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let path = dir.join(SINGLE_FILE);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        edit(&mut tensors);
        candle_core::safetensors::save(&tensors, &path).unwrap();
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let victim = layout::expert(2, 9, "w3");
        edit_weights(dir.path(), |tensors| {
            tensors.remove(&victim);
        });
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        checkpoint.verify(&layout::shared_tensors(&config)).unwrap();
        let err = checkpoint
            .verify(&layout::expert_tensors(&config, 9, 0..4))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("checkpoint is missing tensor {victim}")
        );
    }

    #[test]
    fn a_shape_that_disagrees_with_the_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let victim = layout::attention(1, "k_proj");
        edit_weights(dir.path(), |tensors| {
            tensors.insert(
                victim.clone(),
                Tensor::zeros((32, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        });
        let err = Checkpoint::open(dir.path())
            .unwrap()
            .verify(&layout::shared_tensors(&config))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("tensor {victim} has shape [32, 64], but config.json implies [16, 64]")
        );
    }

    #[test]
    fn a_directory_without_weights_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        crate::synth::write_config(dir.path(), &Preset::Tiny.config(100)).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("has no model.safetensors"), "{err}");
    }
}
