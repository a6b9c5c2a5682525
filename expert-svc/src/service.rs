//! The `moe.v1.Expert` gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use futures::{FutureExt, Stream};
use moe_proto::tensor_codec;
use moe_proto::v1::expert_result::Result as Answer;
use moe_proto::v1::{DescribeRequest, DescribeResponse, ExpertBatch, ExpertResult, expert_server};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{ExpertError, ProductQueue};

/// Answers that may wait for a slow reader before the stream stops reading.
const OUTBOUND_CAPACITY: usize = 256;

type Outbound = mpsc::Sender<Result<ExpertResult, Status>>;

#[derive(Clone)]
pub struct ExpertService {
    products: Arc<ProductQueue>,
    describe: DescribeResponse,
    compute_device: Device,
    hidden_size: usize,
    layers: std::ops::Range<usize>,
    /// Forward streams open now: with more than one, a stream lets the
    /// others queue what they have read before it runs the products.
    open_streams: Arc<AtomicUsize>,
    shutdown: watch::Receiver<bool>,
}

impl ExpertService {
    /// `describe` is what Describe answers (counters aside); `shutdown`
    /// turns true when the process starts draining.
    pub fn new(
        products: ProductQueue,
        describe: DescribeResponse,
        compute_device: Device,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            hidden_size: describe.hidden_size as usize,
            layers: describe.layer_start as usize..describe.layer_end as usize,
            products: Arc::new(products),
            describe,
            compute_device,
            open_streams: Arc::new(AtomicUsize::new(0)),
            shutdown,
        }
    }

    /// Turns true when the process starts draining.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Reads one Forward stream until the caller closes it or the process
    /// drains. Each time a message arrives, it and every message already
    /// read off the connection are queued, and the queued products run on
    /// this task; every message read is answered before the stream ends.
    async fn serve_stream(self, mut inbound: Streaming<ExpertBatch>, outbound: Outbound) {
        let _open = OpenStream::new(&self.open_streams);
        let mut shutdown = self.shutdown.clone();
        let mut ended = false;
        while !ended {
            let first = tokio::select! {
                message = inbound.next() => message,
                _ = shutdown.wait_for(|draining| *draining) => break,
            };
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Some(Ok(batch)) => self.queue(batch, &outbound),
                    Some(Err(status)) => {
                        tracing::debug!(%status, "forward stream ended by the caller");
                        ended = true;
                        break;
                    }
                    None => {
                        ended = true;
                        break;
                    }
                }
                next = inbound.next().now_or_never();
            }
            if self.open_streams.load(Ordering::Relaxed) > 1 {
                // Lets the other streams queue what they have read, so that
                // their messages join these products.
                tokio::task::yield_now().await;
            }
            self.products.run_waiting();
        }
    }

    /// Checks and decodes one message and queues its product; a message
    /// that cannot be computed is answered with its error at once.
    fn queue(&self, batch: ExpertBatch, outbound: &Outbound) {
        let request_id = batch.request_id;
        let queued = self.decode(&batch).and_then(|(layer, rows, dtype)| {
            let outbound = outbound.clone();
            self.products.submit(
                layer,
                rows,
                Box::new(move |output| {
                    let encoded =
                        output.and_then(|output| Ok(tensor_codec::encode(&output, dtype)?));
                    send_answer(&outbound, request_id, encoded);
                }),
            )
        });
        if let Err(err) = queued {
            send_answer(outbound, request_id, Err(err));
        }
    }

    fn decode(
        &self,
        batch: &ExpertBatch,
    ) -> Result<(usize, candle_core::Tensor, moe_proto::WireDType), ExpertError> {
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
        Ok((layer, rows, dtype))
    }
}

/// Puts one answer on its stream. A reader that is behind gets it from a
/// task of its own, so that the products of other streams do not wait; a
/// caller that went away no longer needs it.
fn send_answer(
    outbound: &Outbound,
    request_id: u64,
    result: Result<moe_proto::v1::Tensor, ExpertError>,
) {
    let result = match result {
        Ok(tensor) => Answer::Output(tensor),
        Err(err) => {
            tracing::warn!(request_id, %err, "refused an expert batch");
            Answer::Error(err.to_wire())
        }
    };
    let message = Ok(ExpertResult {
        request_id,
        result: Some(result),
    });
    if let Err(mpsc::error::TrySendError::Full(message)) = outbound.try_send(message) {
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let _ = outbound.send(message).await;
        });
    }
}

/// Counts a Forward stream as open for as long as it lives.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
        let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
        tokio::spawn(self.clone().serve_stream(request.into_inner(), outbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let counters = self.products.counters();
        Ok(Response::new(DescribeResponse {
            rows_served: counters.rows.load(Ordering::Relaxed),
            products_run: counters.products.load(Ordering::Relaxed),
            ..self.describe.clone()
        }))
    }
}
