//! The `moe` command as a user runs it: init a checkpoint, then generate
//! against a running cluster with --json.

use std::process::Command;

use moe_e2e::start;

fn moe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moe"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_then_generate_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let init = moe().arg("init").arg(&model).output().unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(String::from_utf8_lossy(&init.stdout).contains("16 experts (top-2)"));

    let cluster = start(&model, false).await;
    let uri = cluster.router_uri();
    let output = tokio::task::spawn_blocking(move || {
        moe()
            .args([
                "generate",
                "--addr",
                &uri,
                "--max-tokens",
                "6",
                "--temperature",
                "0",
            ])
            .args([
                "--logprobs",
                "--ignore-eos",
                "--json",
                "Licensed under the License",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(json["token_ids"].as_array().unwrap().len(), 6);
    assert_eq!(json["logprobs"].as_array().unwrap().len(), 6);
    assert!(
        json["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l.as_f64().unwrap() <= 0.0)
    );
    assert_eq!(json["finish_reason"], "length");
    assert_eq!(json["usage"]["completion_tokens"], 6);
    assert!(json["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(json["text"].is_string());
}

#[test]
fn generate_reports_a_refusal_and_fails() {
    // No router listens on this port: a clear error and a non-zero exit.
    let output = moe()
        .args(["generate", "--addr", "http://127.0.0.1:9", "hello"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(!output.stderr.is_empty());
}
