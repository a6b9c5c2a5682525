//! Text in, text out: prompts are tokenised with the checkpoint's
//! tokenizer.json, streamed text matches the tokens, and a stop string ends
//! generation with the text cut before it.

use moe_e2e::{generate, start, tiny_checkpoint};
use moe_proto::ExpertMode;
use moe_proto::v1::{GenerateRequest, generate_request::Prompt};

fn greedy_text(prompt: &str, max_tokens: u32, stop: Vec<String>) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::Text(prompt.into())),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        stop,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_string_cuts_the_text_before_it() {
    let model = tiny_checkpoint();
    let cluster = start(model.path(), ExpertMode::InProcess).await;
    let uri = cluster.router_uri();
    let full = generate(&uri, greedy_text("Licensed under the License", 40, vec![]))
        .await
        .unwrap();
    assert_eq!(full.finish_reason, "length");
    assert_eq!(full.usage.completion_tokens, 40);
    assert!(full.usage.prompt_tokens > 0);

    // A stop string taken from the middle of the greedy text: the same
    // greedy run must end there, without it.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "{:?}", full.text);
    let start_at = chars.len() / 2;
    let stop: String = chars[start_at..start_at + 3].iter().collect();
    let cut = full.text.find(&stop).expect("the stop string occurs");
    let stopped = generate(
        &uri,
        greedy_text("Licensed under the License", 40, vec![stop.clone()]),
    )
    .await
    .unwrap();
    assert_eq!(stopped.finish_reason, "stop");
    assert_eq!(stopped.text, full.text[..cut], "stop string {stop:?}");
    assert!(stopped.usage.completion_tokens < 40);
    assert_eq!(
        stopped.token_ids[..],
        full.token_ids[..stopped.token_ids.len()]
    );
}
