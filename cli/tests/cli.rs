//! The `moe` command as a user runs it: init a checkpoint, then generate
//! against a running cluster with --json.

use std::process::{Command, Output};

use moe_e2e::{start, tiny_checkpoint};
use moe_proto::ExpertMode;

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

    let cluster = start(&model, ExpertMode::Distributed).await;
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

/// Runs `moe` with `args` off the runtime's threads, with backtraces off
/// so that stderr is what a user sees.
async fn run_moe(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        moe()
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Exit status 1 with an error on stderr, not a panic (101) or a signal.
fn assert_failed_cleanly(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.starts_with("Error: "), "{stderr}");
    stderr
}

/// The router refuses the request (INVALID_ARGUMENT, which tonic spells
/// "Client specified an invalid argument"), and `moe generate` says so,
/// naming the field at fault, prints no text, and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_reports_a_refusal_and_fails() {
    let model = tiny_checkpoint();
    let cluster = start(model.path(), ExpertMode::InProcess).await;
    let uri = cluster.router_uri();
    let output = run_moe(&[
        "generate",
        "--addr",
        &uri,
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "5000",
    ])
    .await;
    let stderr = assert_failed_cleanly(&output);
    assert!(
        stderr.contains("Client specified an invalid argument: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("plus max_tokens (5000) exceeds the context length (1024)"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);
}

/// No router listens: `moe generate` says it could not connect, and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_reports_an_unreachable_router_and_fails() {
    // Port 9 (discard): nothing listens there on a test machine.
    let output = run_moe(&["generate", "--addr", "http://127.0.0.1:9", "hello"]).await;
    let stderr = assert_failed_cleanly(&output);
    assert!(stderr.contains("tcp connect error"), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
}

/// `moe bench --model DIR --compare-in-process --json`: both modes run the whole
/// workload in two rounds of alternating order, the counts add up, the
/// ratio is over all runs, and the router's counters show one message per
/// expert per layer per micro-batch.
#[test]
fn bench_compares_distributed_with_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    assert!(moe().arg("init").arg(&model).status().unwrap().success());
    let output = moe()
        .arg("bench")
        .arg("--model")
        .arg(&model)
        .args(["--compare-in-process", "--json", "--concurrency", "3"])
        .args([
            "--requests",
            "5",
            "--prompt-tokens",
            "20",
            "--max-tokens",
            "7",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(report["workload"]["requests"], 5);
    let runs = report["runs"].as_array().unwrap();
    let modes: Vec<&str> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(
        modes,
        ["distributed", "in-process", "in-process", "distributed"]
    );
    let rounds: Vec<u64> = runs.iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, [0, 0, 1, 1]);
    for run in runs {
        assert_eq!(run["requests_ok"], 5, "{run}");
        assert_eq!(run["requests_failed"], 0, "{run}");
        // ignore_eos: every request produces exactly max_tokens.
        assert_eq!(run["output_tokens"], 35, "{run}");
        assert!(run["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(run["ttft"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(run["itl"]["p99_ms"].as_f64().unwrap() >= run["itl"]["p50_ms"].as_f64().unwrap());
        let utilisation = run["utilisation"].as_f64().unwrap();
        assert!(utilisation > 0.0 && utilisation < 1.0, "{run}");
    }
    let (distributed, in_process): (Vec<_>, Vec<_>) =
        runs.iter().partition(|run| run["mode"] == "distributed");
    let wire = &distributed[0]["wire"];
    assert_eq!(wire["dtype"], "f32");
    assert_eq!(wire["messages_per_step"], wire["message_bound_per_step"]);
    let overhead = wire["overhead"].as_f64().unwrap();
    // Each message carries ~25 bytes besides its rows; at this tiny width
    // (64 values, one or two rows per message) that is still under 10%.
    assert!((0.0..0.10).contains(&overhead), "{wire}");
    assert!(
        in_process.iter().all(|run| run.get("wire").is_none()),
        "no wire in-process"
    );
    let rate = |runs: &[&serde_json::Value]| {
        let tokens: f64 = runs
            .iter()
            .map(|r| r["output_tokens"].as_f64().unwrap())
            .sum();
        let seconds: f64 = runs.iter().map(|r| r["duration_s"].as_f64().unwrap()).sum();
        tokens / seconds
    };
    let ratio = report["ratio"].as_f64().unwrap();
    assert!(
        (ratio - rate(&distributed) / rate(&in_process)).abs() < 1e-9,
        "{ratio}"
    );
    let per_round = report["ratio_per_round"].as_array().unwrap();
    assert_eq!(per_round.len(), 2);
    let first_round = runs[0]["output_tokens_per_s"].as_f64().unwrap()
        / runs[1]["output_tokens_per_s"].as_f64().unwrap();
    assert!((per_round[0].as_f64().unwrap() - first_round).abs() < 1e-9);
    assert!(report["matmul_peak"]["flops_per_s"].as_f64().unwrap() > 0.0);
}

/// `moe demo` on a fresh directory writes the tiny checkpoint, prints the
/// dashboard's URL while its cluster runs, generates, and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_the_dashboard_url_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let output = run_moe(&[
        "demo",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "8",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("dashboard (while the demo runs): http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("cluster stopped"), "{stdout}");
}

/// `moe up` prints the router's dashboard and metrics URLs, and both
/// answer; SIGTERM stops it and its processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_dashboard_and_metrics_urls_that_answer() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let model = tiny_checkpoint();
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["up", "--model", model.path().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut urls = Vec::new();
    moe_e2e::within("moe up prints its URLs", async {
        while urls.len() < 2 {
            let line = lines.next_line().await.unwrap().expect("moe up is running");
            for label in ["dashboard:", "metrics:"] {
                if let Some(url) = line.trim().strip_prefix(label) {
                    urls.push(url.trim().to_owned());
                }
            }
        }
    })
    .await;
    for url in &urls {
        let (addr, path) = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            .unwrap_or_else(|| panic!("{url} is not http://ADDR/PATH"));
        let (status, body) = moe_e2e::http::get(addr.parse().unwrap(), &format!("/{path}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{url}: {body}");
    }
    assert!(
        urls[0].ends_with("/dashboard") && urls[1].ends_with("/metrics"),
        "{urls:?}"
    );

    let pid = up.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exited = moe_e2e::within("moe up stops on SIGTERM", up.wait())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
}
