//! `moe bench`'s machinery: a deterministic workload, a closed-loop load
//! generator over a [`Target`], and the report: throughput, latency,
//! utilisation of the machine's measured matrix-product rate, and what the
//! router's counters say about bytes and messages on the wire.

pub mod faults;
pub mod flops;
pub mod load;
pub mod targets;
pub mod workload;

use std::fmt;

use indicatif::{ProgressBar, ProgressStyle};
use moe_proto::v1::{ModelInfoRequest, StatsRequest, StatsResponse};
use moe_proto::{ExpertMode, WireDType};
use serde::{Serialize, Serializer};

pub use faults::{FaultReport, Faults, KillLog};
pub use flops::{ModelShape, Peak, measure_peak};
pub use load::{Latency, Measurement, Target, closed_loop};
pub use targets::{Grpc, OpenAi};
pub use workload::{Prompt, Workload};

/// What a run loaded: a moe-serve router in one of its modes, or an
/// OpenAI-compatible server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    MoeServe(ExpertMode),
    OpenAi,
}

/// "distributed", "in-process" or "openai", in tables and JSON alike.
impl fmt::Display for RunMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MoeServe(mode) => mode.fmt(f),
            Self::OpenAi => f.write_str("openai"),
        }
    }
}

impl Serialize for RunMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One run of the workload against one server.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub mode: RunMode,
    /// Which round of a `--compare-in-process --rounds N` run, from 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<usize>,
    #[serde(flatten)]
    pub measurement: Measurement,
    pub model_flops_per_s: f64,
    /// `model_flops_per_s` over the machine's measured matrix-product peak.
    pub utilisation: f64,
    /// Distributed moe-serve only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire: Option<WireReport>,
    /// The processes killed during the run (`--kill-every`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultReport>,
}

/// Traffic between router and experts during the run, from the router's
/// `Stats` counters.
#[derive(Debug, Clone, Serialize)]
pub struct WireReport {
    pub dtype: String,
    pub steps: u64,
    /// Bytes both ways per token per layer, and the least they can be:
    /// top-k rows of d_model values there and back.
    pub bytes_per_token_layer: f64,
    pub min_bytes_per_token_layer: f64,
    /// `bytes_per_token_layer / min_bytes_per_token_layer - 1`.
    pub overhead: f64,
    /// Expert messages per step, and the bound: over the step's layers and
    /// micro-batches, the experts that received rows.
    pub messages_per_step: f64,
    pub message_bound_per_step: f64,
}

impl WireReport {
    /// `None` when nothing went on a wire (the in-process mode).
    fn between(before: &StatsResponse, after: &StatsResponse, shape: &ModelShape) -> Option<Self> {
        let dtype: WireDType = after.wire_dtype.as_deref()?.parse().ok()?;
        let element_bytes = dtype.size_in_bytes() as f64;
        let steps = after.steps - before.steps;
        let token_layers = ((after.step_tokens - before.step_tokens) * shape.layers as u64) as f64;
        if steps == 0 || token_layers == 0.0 {
            return None;
        }
        let bytes = (after.wire_bytes_sent + after.wire_bytes_received
            - before.wire_bytes_sent
            - before.wire_bytes_received) as f64;
        let bytes_per_token_layer = bytes / token_layers;
        let min_bytes_per_token_layer = (shape.top_k * shape.hidden) as f64 * element_bytes * 2.0;
        Some(Self {
            dtype: dtype.to_string(),
            steps,
            bytes_per_token_layer,
            min_bytes_per_token_layer,
            overhead: bytes_per_token_layer / min_bytes_per_token_layer - 1.0,
            messages_per_step: (after.expert_messages - before.expert_messages) as f64
                / steps as f64,
            message_bound_per_step: (after.experts_hit - before.experts_hit) as f64 / steps as f64,
        })
    }
}

/// One short request, so that a run measures serving rather than opening
/// connections and streams (or a server's lazy first-request work).
pub async fn warm_up<T: Target>(target: &T, prompts: &[Prompt]) -> anyhow::Result<()> {
    if let Some(first) = prompts.first() {
        target
            .generate(first, 2, &mut |_| {})
            .await
            .map_err(|err| anyhow::anyhow!("warm-up request failed: {err}"))?;
    }
    Ok(())
}

/// Runs `workload` against `target`, with a progress bar on stderr.
pub async fn run<T: Target>(
    mode: RunMode,
    target: &T,
    workload: &Workload,
    prompts: &[Prompt],
    shape: &ModelShape,
    peak: &Peak,
) -> RunReport {
    let progress = ProgressBar::new(prompts.len() as u64).with_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} requests {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(mode.to_string());
    let measurement = closed_loop(target, workload, prompts, &progress).await;
    progress.finish_and_clear();
    let generated_per_request =
        measurement.output_tokens / (measurement.requests_ok + measurement.requests_failed).max(1);
    let flops = measurement.requests_ok as f64
        * shape.request_flops(workload.prompt_tokens, generated_per_request);
    let model_flops_per_s = flops / measurement.duration_s.max(f64::EPSILON);
    RunReport {
        mode,
        round: None,
        measurement,
        model_flops_per_s,
        utilisation: model_flops_per_s / peak.flops_per_s,
        wire: None,
        faults: None,
    }
}

/// Runs `workload` against a moe-serve router at `uri`, after a warm-up,
/// reading its counters before and after; with `faults`, kills expert
/// processes while the measured requests run, and waits for every one to
/// be back before it returns.
pub async fn run_grpc(
    (uri, access): (&str, &crate::client::Access),
    workload: &Workload,
    prompts: &[Prompt],
    shape: &ModelShape,
    peak: &Peak,
    faults: Option<&Faults<'_>>,
) -> anyhow::Result<RunReport> {
    let target = Grpc::connect(uri, access).await?;
    let mut client = target.client();
    let info = client.model_info(ModelInfoRequest {}).await?.into_inner();
    let mode: ExpertMode = info
        .expert_mode
        .parse()
        .map_err(|err| anyhow::anyhow!("the router at {uri} reports {err}"))?;
    warm_up(&target, prompts).await?;
    let before = client.stats(StatsRequest {}).await?.into_inner();
    let measured = run(
        RunMode::MoeServe(mode),
        &target,
        workload,
        prompts,
        shape,
        peak,
    );
    let mut report = match faults {
        None => measured.await,
        Some(faults) => {
            let restarts_before = faults.restarts();
            let kills = KillLog::default();
            let mut report = tokio::select! {
                report = measured => report,
                never = faults.kill_randomly(&kills) => match never {},
            };
            faults.wait_healed(&kills).await?;
            report.faults = Some(FaultReport {
                kill_every_s: faults.kill_every.as_secs_f64(),
                kills: kills.len(),
                restarts: faults.restarts() - restarts_before,
            });
            report
        }
    };
    let after = client.stats(StatsRequest {}).await?.into_inner();
    report.wire = WireReport::between(&before, &after, shape);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_report_against_the_minimum() {
        let shape = ModelShape {
            layers: 2,
            hidden: 4,
            intermediate: 8,
            heads: 1,
            kv_heads: 1,
            head_dim: 4,
            experts: 4,
            top_k: 2,
            vocab: 10,
        };
        let before = StatsResponse {
            wire_dtype: Some("f32".into()),
            ..Default::default()
        };
        // 10 tokens, 2 layers: the minimum is 20 token-layers * 2 experts
        // * 4 values * 4 bytes * 2 ways = 1280 bytes; 1408 is 10% more.
        let after = StatsResponse {
            steps: 2,
            step_tokens: 10,
            experts_hit: 12,
            expert_messages: 12,
            wire_bytes_sent: 704,
            wire_bytes_received: 704,
            wire_dtype: Some("f32".into()),
            ..Default::default()
        };
        let report = WireReport::between(&before, &after, &shape).unwrap();
        assert_eq!(report.min_bytes_per_token_layer, 64.0);
        assert!((report.overhead - 0.1).abs() < 1e-12);
        assert_eq!(report.messages_per_step, 6.0);
        assert_eq!(report.message_bound_per_step, 6.0);
        let in_process = StatsResponse {
            wire_dtype: None,
            ..after
        };
        assert!(WireReport::between(&before, &in_process, &shape).is_none());
    }
}
