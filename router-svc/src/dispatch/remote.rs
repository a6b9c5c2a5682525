//! One actor per expert replica, keeping one persistent bidirectional
//! `Forward` stream to it and matching results to callers by request id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::expert_result::Result as Outcome;
use moe_proto::v1::{ExpertBatch, ExpertResult};
use moe_proto::{WireDType, tensor_codec, transport};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::RouterError;
use crate::replicas::InFlight;
use crate::replicas::link::{Link, Session};
use crate::stats::RouterStats;

/// How messages go to the experts.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// The longest a replica may take to answer one message; a message's
    /// last try waits this long (earlier tries, less: see the failover).
    pub timeout: Duration,
    /// Element type of the hidden states on the wire.
    pub wire_dtype: WireDType,
    pub hidden_size: usize,
}

/// Messages waiting for the actor, and messages waiting for the stream.
const CALL_QUEUE: usize = 256;
const STREAM_QUEUE: usize = 64;

type Reply = oneshot::Sender<Result<moe_proto::v1::Tensor, RouterError>>;

struct Call {
    layer: u32,
    /// The call span's W3C context when it is sampled; empty otherwise.
    traceparent: String,
    hidden: moe_proto::v1::Tensor,
    reply: Reply,
    /// Held until the replica answers or its stream ends, even when the
    /// caller has stopped waiting: the rows still load the replica.
    in_flight: InFlight,
}

/// A call sent and not yet answered.
struct Pending {
    reply: Reply,
    in_flight: InFlight,
}

/// A handle on the actor that owns one replica's Forward stream.
pub struct EndpointClient {
    /// "expert 3 at http://127.0.0.1:50064": how errors name this replica.
    label: Arc<str>,
    calls: mpsc::Sender<Call>,
    settings: Arc<DispatchSettings>,
    link: Arc<Link>,
}

impl EndpointClient {
    /// Starts the actor. It sends only on the session its supervisor has
    /// checked (see [`Link`]).
    pub fn spawn(
        label: Arc<str>,
        link: Arc<Link>,
        settings: Arc<DispatchSettings>,
        stats: Arc<RouterStats>,
    ) -> Self {
        let (calls, receiver) = mpsc::channel(CALL_QUEUE);
        tokio::spawn(run_actor(label.clone(), link.clone(), receiver, stats));
        Self {
            label,
            calls,
            settings,
            link,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends `rows` rows of `layer` (already encoded) and waits up to
    /// `timeout` for the result, decoded to `[rows, hidden]` f32.
    pub async fn forward(
        &self,
        layer: usize,
        hidden: moe_proto::v1::Tensor,
        rows: usize,
        timeout: Duration,
    ) -> Result<Vec<f32>, RouterError> {
        let width = self.settings.hidden_size;
        // Lives until the answer is decoded: the call's time as the router
        // sees it. Disabled (and free) unless traces are exported.
        let span = tracing::debug_span!(
            target: moe_telemetry::TRACE_TARGET,
            "expert_call",
            replica = %self.label,
            layer,
            rows
        );
        let (reply, result) = oneshot::channel();
        self.calls
            .try_send(Call {
                layer: layer as u32,
                traceparent: moe_telemetry::traceparent(&span).unwrap_or_default(),
                hidden,
                reply,
                in_flight: self.link.load.start(rows as u64),
            })
            .map_err(|err| {
                RouterError::refused(err, || {
                    format!("{}: {CALL_QUEUE} messages already waiting", self.label)
                })
            })?;
        let output = match tokio::time::timeout(timeout, result).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(RouterError::ShuttingDown),
            Err(_) => {
                return Err(RouterError::ExpertTimeout(format!(
                    "{} did not answer layer {layer} within {timeout:?}",
                    self.label
                )));
            }
        };
        let (output, returned_rows) =
            tensor_codec::decode_rows_f32(Some(&output), width).map_err(|err| {
                RouterError::Internal(format!("{} returned a bad tensor: {err}", self.label))
            })?;
        if returned_rows != rows {
            return Err(RouterError::Internal(format!(
                "{} returned {returned_rows} rows for {rows}",
                self.label
            )));
        }
        Ok(output)
    }
}

/// An open Forward stream, on one session's connection.
struct Stream {
    generation: u64,
    outbound: mpsc::Sender<ExpertBatch>,
    inbound: Streaming<ExpertResult>,
}

async fn open_stream(session: &Session) -> Result<Stream, tonic::Status> {
    let (outbound, receiver) = mpsc::channel(STREAM_QUEUE);
    let mut client = transport::expert_client(session.channel.clone());
    let inbound = client
        .forward(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    Ok(Stream {
        generation: session.generation,
        outbound,
        inbound,
    })
}

async fn next_result(stream: &mut Option<Stream>) -> Option<Result<ExpertResult, tonic::Status>> {
    match stream {
        Some(stream) => stream.inbound.message().await.transpose(),
        None => std::future::pending().await,
    }
}

/// Owns the stream and the table of calls awaiting a result. When the
/// stream breaks, every pending call fails at once (naming the replica, so
/// that the dispatcher sends it elsewhere), the replica is reported lost,
/// and nothing is sent until its supervisor has checked a new connection.
async fn run_actor(
    label: Arc<str>,
    link: Arc<Link>,
    mut calls: mpsc::Receiver<Call>,
    stats: Arc<RouterStats>,
) {
    let mut stream: Option<Stream> = None;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 0u64;
    let unavailable = |why: &str| RouterError::ExpertUnavailable(format!("{label}: {why}"));
    loop {
        tokio::select! {
            call = calls.recv() => {
                let Some(call) = call else { break };
                // A newer session replaces the stream; none (the replica
                // was removed) lets the open stream finish its work.
                let current = link.generation();
                if current != 0 && stream.as_ref().is_some_and(|open| open.generation != current) {
                    stream = None;
                    fail_all(&mut pending, || unavailable("its connection was replaced"));
                }
                if stream.is_none() {
                    let Some(session) = link.session() else {
                        let _ = call.reply.send(Err(unavailable("not connected")));
                        continue;
                    };
                    match open_stream(&session).await {
                        Ok(opened) => stream = Some(opened),
                        Err(status) => {
                            link.report_lost(session.generation);
                            let _ = call.reply.send(Err(unavailable(&format!("cannot open a stream: {}", status.message()))));
                            continue;
                        }
                    }
                }
                next_id += 1;
                let batch = ExpertBatch { request_id: next_id, layer: call.layer, hidden: Some(call.hidden), traceparent: call.traceparent };
                pending.insert(next_id, Pending { reply: call.reply, in_flight: call.in_flight });
                stats.record_sent(batch.encoded_len());
                if let Some(open) = &stream
                    && open.outbound.send(batch).await.is_err()
                {
                    link.report_lost(open.generation);
                    stream = None;
                    fail_all(&mut pending, || unavailable("stream closed"));
                }
            }
            result = next_result(&mut stream) => match result {
                Some(Ok(message)) => {
                    stats.record_received(message.encoded_len());
                    match pending.remove(&message.request_id) {
                        Some(Pending { reply, in_flight }) => {
                            let outcome = outcome(&label, message.result);
                            if outcome.is_ok() {
                                in_flight.succeeded();
                            }
                            let _ = reply.send(outcome);
                        }
                        None => tracing::warn!(%label, request_id = message.request_id, "a result for no pending call"),
                    }
                }
                ended => {
                    let why = match ended {
                        Some(Err(status)) => format!("stream failed: {}", status.message()),
                        _ => "the expert closed its stream".to_owned(),
                    };
                    tracing::warn!(%label, %why, "expert stream ended");
                    if let Some(open) = stream.take() {
                        link.report_lost(open.generation);
                    }
                    fail_all(&mut pending, || unavailable(&why));
                }
            }
        }
    }
}

fn fail_all(pending: &mut HashMap<u64, Pending>, error: impl Fn() -> RouterError) {
    for (_, call) in pending.drain() {
        let _ = call.reply.send(Err(error()));
    }
}

fn outcome(label: &str, result: Option<Outcome>) -> Result<moe_proto::v1::Tensor, RouterError> {
    match result {
        Some(Outcome::Output(tensor)) => Ok(tensor),
        Some(Outcome::Error(status)) => {
            let message = format!("{label} refused a batch: {}", status.message);
            Err(match tonic::Code::from_i32(status.code) {
                tonic::Code::ResourceExhausted => RouterError::Overloaded(message),
                tonic::Code::Unavailable => RouterError::ExpertUnavailable(message),
                _ => RouterError::Internal(message),
            })
        }
        None => Err(RouterError::Internal(format!(
            "{label} sent an empty result"
        ))),
    }
}
