use std::path::PathBuf;

use clap::Args;
use moe_model::synth::{self, Preset};

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write config.json, model.safetensors and tokenizer.json to.
    pub dir: PathBuf,
    /// `tiny` (16 experts, top-2, MQA, 4 layers) or `small` (~300M parameters).
    #[arg(long, default_value = "tiny")]
    pub preset: Preset,
    /// Seed of the random weights: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Experts the gate favours, e.g. 3,7: nearly every token goes to
    /// them, for demos and tests of per-expert autoscaling.
    #[arg(long, value_name = "E,...", value_delimiter = ',')]
    pub hot_experts: Vec<usize>,
}

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let config =
        synth::write_checkpoint_favouring(&args.dir, args.preset, args.seed, &args.hot_experts)?;
    println!(
        "wrote {}: {} experts (top-{}), {} layers, d_model {}, {} heads / {} kv heads, vocab {}",
        args.dir.display(),
        config.num_local_experts,
        config.num_experts_per_tok,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size
    );
    Ok(())
}
