//! The router is ready once every expert endpoint has answered Describe
//! with this checkpoint's fingerprint and shape. Until then it says which
//! expert is missing or wrong, in its logs, its health status and its
//! answers to clients.

use std::time::Duration;

use futures::future::join_all;
use moe_model::ModelConfig;
use tokio::sync::watch;

use crate::dispatch::EndpointClient;

/// `Ok(())` once ready; otherwise why not.
pub type Readiness = watch::Receiver<Result<(), String>>;

pub fn not_ready(why: &str) -> (watch::Sender<Result<(), String>>, Readiness) {
    watch::channel(Err(why.to_owned()))
}

/// What each endpoint must report.
pub struct Expected<'a> {
    pub config: &'a ModelConfig,
    pub fingerprint: &'a str,
}

/// Polls every endpoint until all check out, publishing progress on `state`.
pub async fn wait_for_experts(
    endpoints: Vec<(usize, std::ops::Range<usize>, EndpointClient)>,
    expected: Expected<'_>,
    state: watch::Sender<Result<(), String>>,
) {
    let mut last_problem = String::new();
    loop {
        let checks = endpoints
            .iter()
            .map(|(expert, layers, client)| check(*expert, layers, client, &expected));
        let problems: Vec<String> = join_all(checks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if problems.is_empty() {
            tracing::info!(endpoints = endpoints.len(), "every expert answered; ready");
            let _ = state.send(Ok(()));
            return;
        }
        let problem = problems.join("; ");
        if problem != last_problem {
            tracing::warn!(%problem, "waiting for experts");
            last_problem = problem.clone();
        }
        let _ = state.send(Err(problem));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn check(
    expert: usize,
    layers: &std::ops::Range<usize>,
    client: &EndpointClient,
    expected: &Expected<'_>,
) -> Result<(), String> {
    let described = client.describe().await.map_err(|err| err.to_string())?;
    let label = client.label();
    let config = expected.config;
    if described.model_fingerprint != expected.fingerprint {
        return Err(format!(
            "{label} serves another checkpoint (fingerprint {}, router has {})",
            described.model_fingerprint, expected.fingerprint
        ));
    }
    let served = described.layer_start as usize..described.layer_end as usize;
    if described.expert as usize != expert || served != *layers {
        return Err(format!(
            "{label} serves expert {} layers {served:?}, but the cluster expects expert {expert} layers {layers:?}",
            described.expert
        ));
    }
    if described.hidden_size as usize != config.hidden_size
        || described.intermediate_size as usize != config.intermediate_size
        || described.num_experts as usize != config.num_local_experts
    {
        return Err(format!(
            "{label} reports a model shape that differs from the router's"
        ));
    }
    Ok(())
}
