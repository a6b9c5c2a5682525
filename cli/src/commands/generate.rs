use std::io::Write;

use clap::Args;
use moe_proto::v1::{GenerateRequest, TokenIds, generate_request::Prompt};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Router address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Prompt text.
    #[arg(conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub text: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: i32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Report each generated token's log-probability.
    #[arg(long)]
    pub logprobs: bool,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// How to reach a secured router.
#[derive(Debug, Clone, clap::Args)]
pub struct AccessArgs {
    /// Connect over TLS, trusting only this CA certificate (PEM); `moe up
    /// --tls` prints its CA's path.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// The API key to present (`authorization: Bearer KEY`), for a router
    /// with --api-keys-file.
    #[arg(long, env = "MOE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl AccessArgs {
    pub fn access(&self) -> moe::client::Access {
        moe::client::Access {
            ca: self.ca.clone(),
            api_key: self.api_key.clone(),
        }
    }
}

impl GenerateArgs {
    pub fn request(&self) -> GenerateRequest {
        let prompt = match (&self.text, &self.prompt_ids) {
            (_, Some(ids)) => Prompt::TokenIds(TokenIds { ids: ids.clone() }),
            (Some(text), None) => Prompt::Text(text.clone()),
            (None, None) => Prompt::Text(String::new()),
        };
        GenerateRequest {
            prompt: Some(prompt),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
            logprobs: self.logprobs,
            ignore_eos: self.ignore_eos,
        }
    }
}

pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mut client = moe::client::connect_with(&args.addr, &args.access.access()).await?;
    let stream_text = !args.json;
    let completion = moe::client::generate(&mut client, args.request(), |message| {
        if stream_text && !message.text.is_empty() {
            print!("{}", message.text);
            let _ = std::io::stdout().flush();
        }
    })
    .await
    .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?;
    if args.json {
        println!("{}", serde_json::to_string(&completion)?);
    } else {
        println!();
        eprintln!(
            "[{} tokens, finish: {}]",
            completion.usage.completion_tokens, completion.finish_reason
        );
    }
    Ok(())
}
