//! The in-process mode: every expert's kernels in the router's own process,
//! no network. The reference the distributed mode is tested and benchmarked
//! against.
//!
//! A layer's expert forward passes run in parallel on a pool of their own
//! (one expert per thread at a time, as one expert process would), rather
//! than one after another on the scheduler's thread: few-row passes are
//! single-threaded, so running them in turn would leave cores idle.
//!
//! With the generic kernels the rows never leave the device: each
//! expert's rows are gathered, run and weighted as tensors and summed with
//! `index_add` ([`InProcessExperts::combine`]), instead of through the
//! host buffers that the wire needs and the fast kernels share.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use expert_svc::ExpertWeights;
use futures::future::join_all;
use moe_model::{Checkpoint, Kernels, ModelError};

use super::ExpertBackend;
use crate::RouterError;
use crate::gate::ExpertRows;

pub struct InProcessExperts {
    experts: Arc<Vec<ExpertWeights>>,
    /// The expert threads, apart from the scheduler's pool: the scheduler
    /// thread is a worker of that one, and while it waits for a layer's
    /// results it runs no jobs, so passes queued there would get one
    /// thread fewer than the expert processes get.
    pool: rayon::ThreadPool,
    hidden_size: usize,
    device: Device,
    kernels: Kernels,
}

impl InProcessExperts {
    /// Every expert's weights on `device`, computed with `kernels` (on
    /// any device but the CPU, the generic ones whatever is asked).
    pub fn load(
        checkpoint: &Checkpoint,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self, RouterError> {
        Self::load_as(checkpoint, device, kernels, DType::F32)
    }

    /// [`InProcessExperts::load`] with the weights in `dtype` (rows stay
    /// f32: [`ExpertWeights::load_as`]).
    pub fn load_as(
        checkpoint: &Checkpoint,
        device: &Device,
        kernels: Kernels,
        dtype: DType,
    ) -> Result<Self, RouterError> {
        let config = checkpoint.config();
        let kernels = kernels.for_device(device);
        let layers = 0..config.num_hidden_layers;
        let experts = (0..config.num_local_experts)
            .map(|expert| {
                ExpertWeights::load_as(checkpoint, expert, layers.clone(), device, dtype)
                    .map(|weights| weights.with_kernels(kernels))
            })
            .collect::<Result<_, ModelError>>()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|index| format!("in-process-expert-{index}"))
            .build()
            .map_err(|err| {
                RouterError::Internal(format!("cannot start the expert threads: {err}"))
            })?;
        Ok(Self {
            experts: Arc::new(experts),
            pool,
            hidden_size: config.hidden_size,
            device: device.clone(),
            kernels,
        })
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The weighted sum of the experts' outputs for each row of `hidden`
    /// (`[rows, hidden_size]`, on this device), as `routed` says, with
    /// candle operations only: each expert's rows gathered
    /// (`index_select`), run and scaled by their weights on the expert
    /// threads, then summed in expert order (`index_add`), as the host
    /// combine sums them.
    pub async fn combine(
        &self,
        layer: usize,
        routed: &[ExpertRows],
        hidden: &Tensor,
    ) -> Result<Tensor, RouterError> {
        let device = hidden.device();
        let mut passes = Vec::with_capacity(routed.len());
        for expert_rows in routed {
            let count = expert_rows.rows.len();
            passes.push((
                expert_rows.expert,
                Tensor::from_slice(expert_rows.rows.as_slice(), count, device)?,
                Tensor::from_slice(expert_rows.weights.as_slice(), (count, 1), device)?,
            ));
        }
        let calls = passes.iter().map(|(expert, rows, weights)| {
            let (expert, hidden, rows, weights) =
                (*expert, hidden.clone(), rows.clone(), weights.clone());
            self.on_expert_thread(move |experts| {
                let output = experts[expert].forward(layer, &hidden.index_select(&rows, 0)?)?;
                output.broadcast_mul(&weights)
            })
        });
        let outputs = join_all(calls).await;
        let mut combined = hidden.zeros_like()?;
        for ((_, rows, _), output) in passes.iter().zip(outputs) {
            combined = combined.index_add(rows, &output?, 0)?;
        }
        Ok(combined)
    }

    /// Runs `pass` on the expert threads and waits for its result.
    async fn on_expert_thread<T: Send + 'static>(
        &self,
        pass: impl FnOnce(&[ExpertWeights]) -> candle_core::Result<T> + Send + 'static,
    ) -> Result<T, RouterError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let experts = self.experts.clone();
        self.pool.spawn(move || {
            let _ = reply.send(pass(&experts));
        });
        let output = result
            .await
            .map_err(|_| RouterError::Internal("an expert's forward pass panicked".into()))?;
        Ok(output?)
    }
}

impl ExpertBackend for InProcessExperts {
    async fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> Result<Vec<f32>, RouterError> {
        let shape = (rows.len() / self.hidden_size, self.hidden_size);
        let device = self.device.clone();
        self.on_expert_thread(move |experts| {
            let output =
                experts[expert].forward(layer, &Tensor::from_vec(rows, shape, &device)?)?;
            output.flatten_all()?.to_vec1::<f32>()
        })
        .await
    }

    fn on_device(&self) -> Option<&InProcessExperts> {
        (self.kernels == Kernels::Generic).then_some(self)
    }
}

#[cfg(test)]
mod tests {
    use attention_svc::MoeLayer;
    use moe_model::ModelConfig;
    use moe_model::synth::{self, Preset};

    use super::*;
    use crate::OnExpertDown;
    use crate::dispatch::MoeDispatcher;
    use crate::gate::Gate;
    use crate::stats::RouterStats;

    /// In-process experts seen only through [`ExpertBackend::run`]: the
    /// host gather and combine, whatever kernels they run.
    struct HostCombine(InProcessExperts);

    impl ExpertBackend for HostCombine {
        async fn run(
            &self,
            expert: usize,
            layer: usize,
            rows: Vec<f32>,
        ) -> Result<Vec<f32>, RouterError> {
            self.0.run(expert, layer, rows).await
        }
    }

    fn dispatcher<B: ExpertBackend>(checkpoint: &Checkpoint, backend: B) -> MoeDispatcher<B> {
        let config = checkpoint.config();
        MoeDispatcher::new(
            Gate::load(checkpoint, &Device::Cpu).unwrap(),
            backend,
            Arc::new(RouterStats::new(
                config.num_local_experts,
                None,
                crate::metrics::RouterMetrics::detached(
                    config.num_local_experts,
                    config.num_hidden_layers,
                ),
            )),
            OnExpertDown::Fail,
        )
    }

    /// The MoE half of a layer with the generic kernels (rows gathered,
    /// run and summed as tensors) against the host combine over the same
    /// kernels, which it must equal exactly (the same products, summed in
    /// the same order), and against the fast kernels, which it matches to
    /// rounding (|generic - fast| <= 1e-5).
    #[tokio::test]
    async fn the_device_combine_equals_the_host_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig {
            num_local_experts: 6,
            num_experts_per_tok: 3,
            ..Preset::Tiny.config(64)
        };
        synth::write_config(dir.path(), &config).unwrap();
        synth::write_weights(dir.path(), &config, 11).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let load = |kernels| InProcessExperts::load(&checkpoint, &Device::Cpu, kernels).unwrap();
        let on_device = dispatcher(&checkpoint, load(Kernels::Generic));
        assert!(on_device.backend.on_device().is_some());
        let host = dispatcher(&checkpoint, HostCombine(load(Kernels::Generic)));
        let fast = dispatcher(&checkpoint, load(Kernels::Fast));
        assert!(fast.backend.on_device().is_none());
        for (layer, rows) in [(0, 1), (1, 5), (2, 40), (3, 3)] {
            let hidden =
                Tensor::randn(0f32, 1.0, (rows, config.hidden_size), &Device::Cpu).unwrap();
            let values = |output: Tensor| output.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = values(on_device.forward(layer, &hidden).await.unwrap());
            assert_eq!(got, values(host.forward(layer, &hidden).await.unwrap()));
            let expected = values(fast.forward(layer, &hidden).await.unwrap());
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-5,
                    "layer {layer}, {rows} rows: generic {g} vs fast {e}"
                );
            }
        }
    }
}
