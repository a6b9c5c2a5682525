//! Property tests: any GenerateRequest a client can send gives an error or
//! a request within every bound, never a panic.

use std::sync::LazyLock;

use moe_proto::v1::TokenIds;
use proptest::prelude::*;

use super::*;

static TOKENIZER: LazyLock<Tokenizer> =
    LazyLock::new(|| moe_model::synth::train_tokenizer(300).expect("a tokenizer"));

fn config() -> ModelConfig {
    moe_model::synth::Preset::Tiny.config(TOKENIZER.get_vocab_size(true))
}

fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..400, 1 => Just(u32::MAX), 1 => 1000u32..1100, 1 => any::<u32>()]
}

fn edge_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -0.5f32..2.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => any::<f32>(),
    ]
}

fn prompt() -> impl Strategy<Value = Option<Prompt>> {
    prop_oneof![
        1 => Just(None),
        3 => ".{0,64}".prop_map(|text| Some(Prompt::Text(text))),
        1 => Just(Some(Prompt::Text("a".repeat(1024 * MAX_PROMPT_BYTES_PER_TOKEN + 1)))),
        3 => prop::collection::vec(edge_u32(), 0..40)
            .prop_map(|ids| Some(Prompt::TokenIds(TokenIds { ids }))),
        1 => (1usize..1100).prop_map(|n| Some(Prompt::TokenIds(TokenIds { ids: vec![1; n] }))),
    ]
}

fn stop() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![4 => ".{0,8}", 1 => Just(String::new()), 1 => ".{250,260}"],
        0..20,
    )
}

fn request() -> impl Strategy<Value = GenerateRequest> {
    (
        prompt(),
        prop::option::of(edge_u32()),
        prop::option::of(edge_f32()),
        prop::option::of(edge_f32()),
        prop_oneof![3 => -2i32..100, 1 => any::<i32>()],
        prop::option::of(any::<u64>()),
        stop(),
        any::<(bool, bool)>(),
    )
        .prop_map(
            |(
                prompt,
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                (logprobs, ignore_eos),
            )| {
                GenerateRequest {
                    prompt,
                    max_tokens,
                    temperature,
                    top_p,
                    top_k,
                    seed,
                    stop,
                    logprobs,
                    ignore_eos,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_request_is_refused_or_within_every_bound(request in request()) {
        let config = config();
        let context = config.max_position_embeddings;
        let asked_seed = request.seed;
        match validate(request, &config, Some(&TOKENIZER)) {
            Ok(valid) => {
                prop_assert!(!valid.prompt.is_empty());
                prop_assert!(valid.prompt.iter().all(|&id| (id as usize) < config.vocab_size));
                prop_assert!(valid.max_tokens >= 1);
                prop_assert!(valid.prompt.len() + valid.max_tokens <= context);
                let sampling = valid.sampling;
                prop_assert!(sampling.temperature.is_finite() && sampling.temperature >= 0.0);
                prop_assert!(sampling.top_p > 0.0 && sampling.top_p <= 1.0);
                if let Some(seed) = asked_seed {
                    prop_assert_eq!(sampling.seed, seed);
                }
                prop_assert!(valid.stop.len() <= MAX_STOP_STRINGS);
                prop_assert!(valid.stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES));
            }
            Err(err) => {
                prop_assert!(!err.to_string().is_empty());
                prop_assert!(matches!(
                    err,
                    RouterError::InvalidArgument(_) | RouterError::FailedPrecondition(_)
                ));
            }
        }
    }
}
