//! The `moe.v1.Expert` gRPC service.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use candle_core::Device;
use futures::Stream;
use moe_proto::tensor_codec;
use moe_proto::v1::expert_result::Result as Answer;
use moe_proto::v1::{DescribeRequest, DescribeResponse, ExpertBatch, ExpertResult, expert_server};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{DeviceHandle, ExpertError};

/// Answers that may wait for a slow reader before the stream stops reading.
const OUTBOUND_CAPACITY: usize = 256;

#[derive(Clone)]
pub struct ExpertService {
    device: DeviceHandle,
    describe: DescribeResponse,
    compute_device: Device,
    hidden_size: usize,
    layers: std::ops::Range<usize>,
    shutdown: watch::Receiver<bool>,
}

impl ExpertService {
    /// `describe` is what Describe answers (counters aside); `shutdown`
    /// turns true when the process starts draining.
    pub fn new(
        device: DeviceHandle,
        describe: DescribeResponse,
        compute_device: Device,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            hidden_size: describe.hidden_size as usize,
            layers: describe.layer_start as usize..describe.layer_end as usize,
            device,
            describe,
            compute_device,
            shutdown,
        }
    }

    /// Turns true when the process starts draining.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Decodes, computes and encodes one message's answer.
    async fn answer(&self, batch: ExpertBatch) -> Result<moe_proto::v1::Tensor, ExpertError> {
        let layer = batch.layer as usize;
        if !self.layers.contains(&layer) {
            return Err(ExpertError::Layer {
                layer: batch.layer,
                start: self.layers.start,
                end: self.layers.end,
            });
        }
        let (rows, dtype) = tensor_codec::decode_rows(
            batch.hidden.as_ref(),
            self.hidden_size,
            &self.compute_device,
        )?;
        let output = self.device.forward(layer, rows).await?;
        Ok(tensor_codec::encode(&output, dtype)?)
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<ExpertResult, Status>> + Send>>;

#[tonic::async_trait]
impl expert_server::Expert for ExpertService {
    type ForwardStream = ResultStream;

    /// Reads messages until the caller closes the stream or the process
    /// drains, answering each as soon as it is computed. Every message in
    /// flight is answered before the stream ends.
    async fn forward(
        &self,
        request: Request<Streaming<ExpertBatch>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
        let service = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.next() => message,
                    _ = shutdown.wait_for(|draining| *draining) => break,
                };
                let batch = match message {
                    Some(Ok(batch)) => batch,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "forward stream ended by the caller");
                        break;
                    }
                    None => break,
                };
                let (service, outbound) = (service.clone(), outbound.clone());
                tokio::spawn(async move {
                    let request_id = batch.request_id;
                    let result = match service.answer(batch).await {
                        Ok(tensor) => Answer::Output(tensor),
                        Err(err) => {
                            tracing::warn!(request_id, %err, "refused an expert batch");
                            Answer::Error(err.to_wire())
                        }
                    };
                    let message = ExpertResult {
                        request_id,
                        result: Some(result),
                    };
                    // The caller may have gone; its answer is then moot.
                    let _ = outbound.send(Ok(message)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let counters = self.device.counters();
        Ok(Response::new(DescribeResponse {
            rows_served: counters.rows.load(Ordering::Relaxed),
            products_run: counters.products.load(Ordering::Relaxed),
            ..self.describe.clone()
        }))
    }
}
