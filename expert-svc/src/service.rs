//! The `moe.v1.Expert` gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use futures::{FutureExt, Stream};
use moe_proto::v1::expert_result::Result as Outcome;
use moe_proto::v1::{DescribeRequest, DescribeResponse, ExpertBatch, ExpertResult, expert_server};
use moe_proto::{client_fault, tensor_codec};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::ExpertMetrics;
use crate::{ExpertError, ForwardQueue};

/// What limits an expert's messages, for refusals to name.
const MAX_ROWS_LIMIT: &str = "--max-rows rows of the model's width";

/// Results that may wait for a slow reader before the stream stops reading.
const OUTBOUND_CAPACITY: usize = 256;

type Outbound = mpsc::Sender<Result<ExpertResult, Status>>;

#[derive(Clone)]
pub struct ExpertService {
    queue: Arc<ForwardQueue>,
    metrics: Arc<ExpertMetrics>,
    describe: DescribeResponse,
    compute_device: Device,
    hidden_size: usize,
    /// Forward streams open now: with more than one, a stream lets the
    /// others queue what they have read before it runs the queue.
    open_streams: Arc<AtomicUsize>,
    draining: watch::Receiver<bool>,
}

impl ExpertService {
    /// `describe` is what Describe reports (counters aside); `draining`
    /// turns true when the process starts draining.
    pub fn new(
        queue: ForwardQueue,
        metrics: Arc<ExpertMetrics>,
        describe: DescribeResponse,
        compute_device: Device,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            metrics,
            hidden_size: describe.hidden_size as usize,
            queue: Arc::new(queue),
            describe,
            compute_device,
            open_streams: Arc::new(AtomicUsize::new(0)),
            draining,
        }
    }

    /// Reads one Forward stream until the caller closes it or the process
    /// drains. Each time a message arrives, it and every message already
    /// read off the connection are queued, and the queued forward passes
    /// run on this task; every message read gets its result before the
    /// stream ends.
    ///
    /// The passes run on a tokio worker thread on purpose, not on a
    /// blocking pool: handing each message to another thread and back cost
    /// more than the pass itself at decode sizes (docs/decisions.md). It is
    /// safe because an expert process serves nothing but this queue: while
    /// a pass runs, the process's other work (reading the next messages,
    /// health checks) waits for that one pass at most, or runs on another
    /// worker thread when the runtime has more than one.
    async fn serve_stream(self, mut inbound: Streaming<ExpertBatch>, outbound: Outbound) {
        let _open = OpenStream::new(&self.open_streams);
        let mut draining = self.draining.clone();
        let mut ended = false;
        // A message the caller sent that could not be decoded: the stream's
        // final status, once what was read before it is answered.
        let mut refused = None;
        while !ended {
            // Draining first: once it starts, no new message is read, even
            // one that is already waiting.
            let first = tokio::select! {
                biased;
                _ = draining.wait_for(|draining| *draining) => break,
                message = inbound.next() => message,
            };
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Some(Ok(batch)) => self.enqueue(batch, &outbound),
                    Some(Err(status)) => {
                        refused = client_fault::blame_client(&status, MAX_ROWS_LIMIT);
                        match &refused {
                            Some(refusal) => {
                                tracing::warn!(%refusal, "refused an undecodable forward message")
                            }
                            None => tracing::debug!(%status, "forward stream ended by the caller"),
                        }
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
                // their messages join these passes.
                tokio::task::yield_now().await;
            }
            self.queue.run_queued();
        }
        if let Some(refusal) = refused {
            let _ = outbound.send(Err(refusal)).await;
        }
    }

    /// Decodes one message's rows and queues its forward pass (the queue
    /// checks its layer); a message that cannot be computed gets its error
    /// at once.
    fn enqueue(&self, batch: ExpertBatch, outbound: &Outbound) {
        let request_id = batch.request_id;
        let queued = tensor_codec::decode_rows(
            batch.hidden.as_ref(),
            self.hidden_size,
            &self.compute_device,
        )
        .map_err(ExpertError::from)
        .and_then(|(rows, dtype)| {
            let count = rows.dim(0).unwrap_or(0);
            self.metrics.message(count);
            let span = product_span(&batch, count);
            let outbound = outbound.clone();
            let metrics = self.metrics.clone();
            self.queue.submit_traced(
                batch.layer as usize,
                rows,
                Box::new(move |output| {
                    let encoded =
                        output.and_then(|output| Ok(tensor_codec::encode(&output, dtype)?));
                    send_result(&outbound, request_id, encoded, &metrics);
                }),
                span,
            )
        });
        if let Err(err) = queued {
            send_result(outbound, request_id, Err(err), &self.metrics);
        }
    }
}

/// Puts one message's result on its stream. A reader that is behind gets
/// it from a task of its own, so that the passes of other streams do not
/// wait; a caller that went away no longer needs it.
fn send_result(
    outbound: &Outbound,
    request_id: u64,
    result: Result<moe_proto::v1::Tensor, ExpertError>,
    metrics: &ExpertMetrics,
) {
    let result = match result {
        Ok(tensor) => Outcome::Output(tensor),
        Err(err) => {
            metrics.error(err.code());
            tracing::warn!(request_id, %err, "refused an expert batch");
            Outcome::Error(err.to_wire())
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

/// The span of one message's product, a child of the router's call span,
/// when the router traces the message (sent its `traceparent`); none
/// otherwise, at no cost.
fn product_span(batch: &ExpertBatch, rows: usize) -> tracing::Span {
    if batch.traceparent.is_empty() {
        return tracing::Span::none();
    }
    let span = tracing::debug_span!(
        target: moe_telemetry::TRACE_TARGET,
        "expert_product",
        layer = batch.layer,
        rows
    );
    moe_telemetry::continue_remote(&span, &batch.traceparent);
    span
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
    /// drains, sending each result as soon as it is computed. Every message
    /// in flight gets its result before the stream ends.
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
        let counters = self.queue.counters();
        Ok(Response::new(DescribeResponse {
            rows_served: counters.rows.load(Ordering::Relaxed),
            forward_passes: counters.passes.load(Ordering::Relaxed),
            busy_seconds: counters.busy_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            ..self.describe.clone()
        }))
    }
}
