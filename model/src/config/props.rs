//! Property tests: any config.json gives an error or a config whose sizes
//! every later computation can use, never a panic.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

/// Sizes that are mostly plausible and sometimes absurd.
fn size() -> impl Strategy<Value = Value> {
    prop_oneof![
        120 => prop::sample::select(vec![1u64, 2, 4, 8, 16, 32]).prop_map(Value::from),
        4 => (1u64..64).prop_map(Value::from),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => Just(json!(u64::MAX)),
        1 => (1u64 << 31..1u64 << 40).prop_map(Value::from),
        1 => Just(json!(1.5)),
        1 => Just(json!("8")),
        1 => Just(Value::Null),
    ]
}

fn float() -> impl Strategy<Value = Value> {
    prop_oneof![
        12 => (1e-8f64..1e7).prop_map(Value::from),
        1 => Just(json!(0.0)),
        1 => Just(json!(-1e6)),
        1 => Just(json!(1e308)),
        1 => Just(json!("1e6")),
    ]
}

const SIZES: [&str; 9] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_local_experts",
];

fn config_json() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((size(), any::<bool>()), SIZES.len()),
        (
            size(),
            float(),
            float(),
            prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
        ),
        prop::option::of(prop_oneof![
            4 => Just(json!(2)),
            1 => Just(json!([2, 3])),
            1 => Just(json!(-2)),
            1 => Just(json!("2"))
        ]),
        prop::option::of(prop_oneof![
            4 => Just(json!({"rope_theta": 10000.0})),
            1 => Just(json!({"rope_type": "yarn"})),
            1 => Just(json!({})),
            1 => Just(json!(7)),
        ]),
    )
        .prop_map(|(sizes, (top_k, eps, theta, absent), eos, rope)| {
            let mut object = serde_json::Map::new();
            for (name, (value, present)) in SIZES.iter().zip(sizes) {
                if present || !name.starts_with("num_key") && !name.starts_with("head") {
                    object.insert((*name).into(), value);
                }
            }
            let optional = [
                ("num_experts_per_tok", top_k),
                ("rms_norm_eps", eps),
                ("rope_theta", theta),
                ("eos_token_id", eos.unwrap_or(Value::Null)),
                ("rope_parameters", rope.unwrap_or(Value::Null)),
            ];
            for (bit, (name, value)) in optional.into_iter().enumerate() {
                if absent & (1 << bit) == 0 {
                    object.insert(name.into(), value);
                }
            }
            Value::Object(object).to_string()
        })
}

/// Every product of sizes that loading and serving compute.
fn assert_usable(config: &ModelConfig) -> Result<(), TestCaseError> {
    prop_assert!(config.hidden_size > 0 && config.vocab_size > 0);
    prop_assert!(config.num_experts_per_tok <= config.num_local_experts);
    prop_assert!(
        config
            .num_attention_heads
            .is_multiple_of(config.num_key_value_heads)
    );
    prop_assert!(config.head_dim > 0 && config.head_dim.is_multiple_of(2));
    prop_assert!(config.rope_theta.is_finite() && config.rope_theta > 0.0);
    prop_assert!(config.rms_norm_eps.is_finite() && config.rms_norm_eps >= 0.0);
    // These compute without overflowing.
    let _ = (config.q_width(), config.kv_width());
    let _ = config.to_hf_json();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_config_json_is_refused_or_usable(text in config_json()) {
        if let Ok(config) = ModelConfig::from_json(&text) {
            assert_usable(&config)?;
        }
    }

    #[test]
    fn any_text_is_refused_or_usable(text in ".{0,80}") {
        if let Ok(config) = ModelConfig::from_json(&text) {
            assert_usable(&config)?;
        }
    }
}
