//! Deterministic synthetic checkpoints, so that everything runs with no
//! download: `moe init` writes one, and the tests build their own.
//!
//! The same preset and seed always give the same bytes: weights come from a
//! ChaCha stream seeded by the tensor's name, and the tokenizer is a
//! byte-level BPE trained by a small deterministic trainer on license texts
//! embedded in this crate.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
};

use crate::{CONFIG_FILE, ModelConfig, ModelError, SINGLE_FILE, TOKENIZER_FILE, layout};

const CORPUS: &str = include_str!("tokenizer_corpus.txt");
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// The shapes `moe init` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// A few layers of 16 top-2 experts with MQA: the default, for demos and
    /// tests (about 2M parameters).
    #[default]
    Tiny,
    /// About 300M parameters (16 experts of width 1408, d_model 512, 8
    /// layers, GQA): for benchmarks.
    Small,
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            other => Err(format!("unknown preset {other:?}: expected tiny or small")),
        }
    }
}

impl Preset {
    /// BPE merges to train on top of the 256 byte tokens.
    fn merges(self) -> usize {
        match self {
            Self::Tiny => 254,
            Self::Small => 4000,
        }
    }

    /// The config for a tokenizer of `vocab_size` tokens.
    pub fn config(self, vocab_size: usize) -> ModelConfig {
        let base = ModelConfig {
            model_type: "mixtral".into(),
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            head_dim: 16,
            max_position_embeddings: 1024,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            num_local_experts: 16,
            num_experts_per_tok: 2,
            tie_word_embeddings: false,
            bos_token_id: Some(0),
            eos_token_ids: vec![1],
            dtype: "float32".into(),
        };
        match self {
            Self::Tiny => base,
            Self::Small => ModelConfig {
                hidden_size: 512,
                intermediate_size: 1408,
                num_hidden_layers: 8,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                head_dim: 64,
                max_position_embeddings: 4096,
                ..base
            },
        }
    }
}

/// The English text the tokenizers are trained on; benchmarks cut their
/// prompts from it, so prompts are text the tokenizer has seen.
pub fn corpus() -> &'static str {
    CORPUS
}

/// Writes config.json, model.safetensors and tokenizer.json into `dir`.
pub fn write_checkpoint(dir: &Path, preset: Preset, seed: u64) -> Result<ModelConfig, ModelError> {
    write_checkpoint_favouring(dir, preset, seed, &[])
}

/// [`write_checkpoint`], with a gate that sends nearly every token to the
/// `hot` experts (when there are as many as the model picks per token, to
/// exactly those), so that load is skewed the way real routing is: for
/// demos and tests of per-expert autoscaling.
///
/// Every token's embedding gets a constant component (dimension 0), which
/// the residual stream carries to every layer's gate, and the hot experts'
/// gate rows weigh that component heavily.
pub fn write_checkpoint_favouring(
    dir: &Path,
    preset: Preset,
    seed: u64,
    hot: &[usize],
) -> Result<ModelConfig, ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let tokenizer = train_tokenizer(preset.merges())?;
    tokenizer
        .save(dir.join(TOKENIZER_FILE), false)
        .map_err(|err| ModelError::Tokenizer(err.to_string()))?;
    let config = preset.config(tokenizer.get_vocab_size(true));
    if let Some(&expert) = hot.iter().find(|&&e| e >= config.num_local_experts) {
        return Err(ModelError::Config(format!(
            "hot expert {expert}: the model has {} experts",
            config.num_local_experts
        )));
    }
    write_config(dir, &config)?;
    let mut tensors = random_weights(&config, seed)?;
    if !hot.is_empty() {
        favour(&mut tensors, &config, hot)?;
    }
    save(dir, &tensors)?;
    Ok(config)
}

/// The constant embedding component, and the gate weight on it.
const HOT_OFFSET: f32 = 4.0;
const HOT_GATE_WEIGHT: f32 = 5.0;

fn favour(
    tensors: &mut HashMap<String, Tensor>,
    config: &ModelConfig,
    hot: &[usize],
) -> Result<(), ModelError> {
    let set_column = |tensor: &Tensor, rows: &[usize], value: f32| -> candle_core::Result<Tensor> {
        let (height, width) = tensor.dims2()?;
        let mut values = tensor.flatten_all()?.to_vec1::<f32>()?;
        for &row in rows {
            values[row * width] = value;
        }
        Tensor::from_vec(values, (height, width), &Device::Cpu)
    };
    let embed = layout::embed_tokens();
    let all_tokens: Vec<usize> = (0..config.vocab_size).collect();
    let offset = set_column(&tensors[&embed], &all_tokens, HOT_OFFSET)?;
    tensors.insert(embed, offset);
    for layer in 0..config.num_hidden_layers {
        let gate = layout::gate(layer);
        let favoured = set_column(&tensors[&gate], hot, HOT_GATE_WEIGHT)?;
        tensors.insert(gate, favoured);
    }
    Ok(())
}

pub fn write_config(dir: &Path, config: &ModelConfig) -> Result<(), ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config.to_hf_json()).expect("json serialises");
    std::fs::write(&path, text).map_err(|source| ModelError::Io { path, source })
}

/// Random weights for every tensor of `config`, in one safetensors file.
pub fn write_weights(dir: &Path, config: &ModelConfig, seed: u64) -> Result<(), ModelError> {
    save(dir, &random_weights(config, seed)?)
}

fn save(dir: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), ModelError> {
    candle_core::safetensors::save(tensors, dir.join(SINGLE_FILE))?;
    Ok(())
}

fn random_weights(config: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut specs = layout::shared_tensors(config);
    for expert in 0..config.num_local_experts {
        specs.extend(layout::expert_tensors(
            config,
            expert,
            0..config.num_hidden_layers,
        ));
    }
    let mut tensors = HashMap::new();
    for spec in specs {
        let tensor = if spec.shape.len() == 1 {
            Tensor::ones(spec.shape.as_slice(), candle_core::DType::F32, &Device::Cpu)?
        } else {
            random_matrix(
                &spec.name,
                &spec.shape,
                init_scale(&spec.name, config),
                seed,
            )?
        };
        tensors.insert(spec.name, tensor);
    }
    Ok(tensors)
}

/// Standard deviation of each matrix: 1/sqrt(fan_in) keeps activations at
/// unit scale; the gate and LM head get more so that routing and sampling
/// are decisive rather than near-uniform.
fn init_scale(name: &str, config: &ModelConfig) -> f32 {
    let fan_in = |width: usize| 1.0 / (width as f32).sqrt();
    if name.ends_with("gate.weight") {
        4.0 * fan_in(config.hidden_size)
    } else if name == layout::lm_head() {
        3.0 * fan_in(config.hidden_size)
    } else if name == layout::embed_tokens() {
        1.0
    } else if name.ends_with("w2.weight") {
        fan_in(config.intermediate_size)
    } else if name.ends_with("o_proj.weight") {
        fan_in(config.q_width())
    } else {
        fan_in(config.hidden_size)
    }
}

/// Uniform values of standard deviation `std`, from a stream seeded by the
/// tensor's name, so each tensor is the same whatever else the preset holds.
fn random_matrix(name: &str, shape: &[usize], std: f32, seed: u64) -> Result<Tensor, ModelError> {
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(name)
        .finalize();
    let mut rng = ChaCha8Rng::from_seed(digest.into());
    let bound = std * 3f32.sqrt();
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// GPT-2's reversible map from bytes to printable characters, which is what
/// a ByteLevel pre-tokenizer produces and a ByteLevel decoder undoes.
fn byte_to_char() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("printable byte")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("offset code point")
            }
        })
        .collect()
}

/// A byte-level BPE with `<s>` = 0, `</s>` = 1, the 256 bytes, then up to
/// `merges` merges learnt greedily (most frequent pair, ties broken by the
/// pair's text) from the embedded corpus.
pub fn train_tokenizer(merges: usize) -> Result<Tokenizer, ModelError> {
    let words = corpus_words()?;
    let mut vocab: Vec<String> = vec![BOS.into(), EOS.into()];
    vocab.extend(byte_to_char().into_iter().map(String::from));
    let learnt = learn_merges(words, merges);
    vocab.extend(learnt.iter().map(|(a, b)| format!("{a}{b}")));
    let ids: Vocab = vocab
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(ids, learnt)
        .build()
        .map_err(|err| ModelError::Tokenizer(err.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
    Ok(tokenizer)
}

/// Every pre-tokenised word of the corpus, as byte-level symbols, with its count.
fn corpus_words() -> Result<BTreeMap<Vec<String>, usize>, ModelError> {
    let mut text = PreTokenizedString::from(CORPUS);
    ByteLevel::new(false, true, true)
        .pre_tokenize(&mut text)
        .map_err(|err| ModelError::Tokenizer(err.to_string()))?;
    let mut words = BTreeMap::new();
    for (word, _, _) in text.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        let symbols = word.chars().map(String::from).collect();
        *words.entry(symbols).or_insert(0) += 1;
    }
    Ok(words)
}

fn learn_merges(words: BTreeMap<Vec<String>, usize>, merges: usize) -> Vec<(String, String)> {
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    let mut learnt = Vec::with_capacity(merges);
    while learnt.len() < merges {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (symbols, count) in &words {
            for pair in symbols.windows(2) {
                *counts.entry((&pair[0], &pair[1])).or_insert(0) += count;
            }
        }
        // Highest count wins; among equals, the first pair in text order.
        let Some(((a, b), _)) =
            counts
                .into_iter()
                .fold(
                    None,
                    |best: Option<((&str, &str), usize)>, (pair, n)| match best {
                        Some((_, m)) if m >= n => best,
                        _ => Some((pair, n)),
                    },
                )
        else {
            break;
        };
        let (a, b) = (a.to_owned(), b.to_owned());
        let merged = format!("{a}{b}");
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = merged.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        learnt.push((a, b));
    }
    learnt
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Checkpoint;

    #[test]
    fn tokenizer_round_trips_text_and_is_deterministic() {
        let tokenizer = train_tokenizer(100).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), 2 + 256 + 100);
        let text = "Licensed under the Apache License — ünïcödé too";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.len() < text.len(), "merges shorten the common words");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        let again = train_tokenizer(100).unwrap();
        assert_eq!(again.encode(text, false).unwrap().get_ids(), ids.as_slice());
    }

    #[test]
    fn tiny_checkpoint_opens_and_is_reproducible() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_checkpoint(a.path(), Preset::Tiny, 7).unwrap();
        write_checkpoint(b.path(), Preset::Tiny, 7).unwrap();
        let (ca, cb) = (
            Checkpoint::open(a.path()).unwrap(),
            Checkpoint::open(b.path()).unwrap(),
        );
        assert_eq!(ca.config().num_local_experts, 16);
        assert_eq!(ca.config().num_experts_per_tok, 2);
        assert_eq!(ca.config().num_key_value_heads, 1);
        assert_eq!(ca.fingerprint(), cb.fingerprint());
        ca.verify(&layout::shared_tensors(ca.config())).unwrap();
        ca.verify(&layout::expert_tensors(ca.config(), 15, 0..4))
            .unwrap();

        let c = tempfile::tempdir().unwrap();
        write_checkpoint(c.path(), Preset::Tiny, 8).unwrap();
        assert_ne!(
            Checkpoint::open(c.path()).unwrap().fingerprint(),
            ca.fingerprint()
        );
    }
}
