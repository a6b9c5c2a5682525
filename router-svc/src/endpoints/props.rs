//! Property tests: any cluster file or `--expert` flag gives an error or
//! endpoints that the layout can check, never a panic.

use std::path::Path;

use proptest::prelude::*;

use super::*;

/// JSON values a hand-edited cluster file might hold where a field goes.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0u64..20).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[0-9]{0,3}\\.\\.[0-9]{0,3}".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        "(http://|unix:|dns:///)?[a-z0-9.:/]{0,16}".prop_map(Value::from),
    ]
}

fn entry() -> impl Strategy<Value = serde_json::Value> {
    (json_value(), json_value(), json_value(), any::<[bool; 3]>()).prop_map(
        |(expert, endpoint, layers, present)| {
            let mut entry = serde_json::Map::new();
            for ((name, value), present) in [
                ("expert", expert),
                ("endpoint", endpoint),
                ("layers", layers),
            ]
            .into_iter()
            .zip(present)
            {
                if present {
                    entry.insert(name.into(), value);
                }
            }
            serde_json::Value::Object(entry)
        },
    )
}

/// A cluster file's text: structured (mostly well-formed JSON of the
/// right shape) or any text at all.
fn cluster_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(entry(), 0..6)
            .prop_map(|entries| serde_json::json!({ "experts": entries }).to_string()),
        1 => json_value().prop_map(|value| value.to_string()),
        1 => ".{0,64}",
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    ]
}

fn check(endpoints: &[ExpertEndpoint]) -> Result<(), TestCaseError> {
    for endpoint in endpoints {
        prop_assert!(!endpoint.uri.is_empty());
        if let Some(layers) = &endpoint.layers {
            prop_assert!(layers.start < layers.end);
        }
    }
    // The layout takes any parsed endpoints: refused, or covering the model.
    if let Ok(layout) = layout(endpoints, 4, 3) {
        prop_assert_eq!(layout.len(), 4);
        for served in &layout {
            prop_assert!((0..3).all(|l| served.iter().any(|(range, _)| range.contains(&l))));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_cluster_file_is_refused_or_parsed(text in cluster_text()) {
        if let Ok(endpoints) = parse_cluster_file(&text, Path::new("cluster.json")) {
            check(&endpoints)?;
        }
    }

    #[test]
    fn any_expert_flag_is_refused_or_parsed(
        flag in prop_oneof![
            "[0-9]{1,3}(@[0-9]{0,2}\\.\\.[0-9]{0,2})?=.{0,16}",
            ".{0,24}",
        ]
    ) {
        if let Ok(endpoint) = parse_flag(&flag) {
            check(&[endpoint])?;
        }
    }
}
