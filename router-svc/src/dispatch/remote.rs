//! The distributed mode: one actor per expert endpoint, each keeping one
//! persistent bidirectional `Forward` stream to its expert process and
//! matching results to callers by request id.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::expert_result::Result as Outcome;
use moe_proto::v1::{DescribeRequest, DescribeResponse, ExpertBatch, ExpertResult};
use moe_proto::{WireDType, tensor_codec, transport};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use super::ExpertBackend;
use crate::RouterError;
use crate::replicas::{LoadTracker, picker};
use crate::stats::RouterStats;

/// How every endpoint actor talks to its expert.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// An expert that has not replied to a message by then is reported.
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
    hidden: moe_proto::v1::Tensor,
    reply: Reply,
}

/// A cloneable handle on the actor that owns one endpoint's stream.
#[derive(Clone)]
pub struct EndpointClient {
    /// "expert 3 at http://127.0.0.1:50064": how errors name this endpoint.
    label: Arc<str>,
    channel: Channel,
    calls: mpsc::Sender<Call>,
    settings: Arc<DispatchSettings>,
    /// What this router has in flight to the endpoint, and its latency.
    load: Arc<LoadTracker>,
}

impl EndpointClient {
    /// Starts the actor. Nothing connects until the first call: a cluster
    /// may come up in any order.
    pub fn spawn(
        expert: usize,
        uri: &str,
        settings: DispatchSettings,
        stats: Arc<RouterStats>,
    ) -> Result<Self, RouterError> {
        let channel = transport::endpoint(uri)?.connect_lazy();
        let label: Arc<str> = format!("expert {expert} at {uri}").into();
        let (calls, receiver) = mpsc::channel(CALL_QUEUE);
        tokio::spawn(run_actor(label.clone(), channel.clone(), receiver, stats));
        Ok(Self {
            label,
            channel,
            calls,
            settings: Arc::new(settings),
            load: Arc::default(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    fn client(&self) -> ExpertClient<Channel> {
        transport::expert_client(self.channel.clone())
    }

    pub async fn describe(&self) -> Result<DescribeResponse, RouterError> {
        let mut client = self.client();
        match tokio::time::timeout(self.settings.timeout, client.describe(DescribeRequest {})).await
        {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(RouterError::ExpertUnavailable(format!(
                "{}: {}",
                self.label,
                status.message()
            ))),
            Err(_) => Err(RouterError::ExpertTimeout(format!(
                "{} did not answer Describe",
                self.label
            ))),
        }
    }

    /// Sends `rows` (`[n, hidden]`, row-major) of `layer` and waits for the
    /// result, of the same shape.
    pub async fn forward(&self, layer: usize, rows: Vec<f32>) -> Result<Vec<f32>, RouterError> {
        let width = self.settings.hidden_size;
        let expected_rows = rows.len() / width;
        let hidden = tensor_codec::encode_rows(rows, width, self.settings.wire_dtype);
        let in_flight = self.load.start(expected_rows as u64);
        let (reply, result) = oneshot::channel();
        self.calls
            .try_send(Call {
                layer: layer as u32,
                hidden,
                reply,
            })
            .map_err(|err| {
                RouterError::refused(err, || {
                    format!("{}: {CALL_QUEUE} messages already waiting", self.label)
                })
            })?;
        let output = match tokio::time::timeout(self.settings.timeout, result).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(RouterError::ShuttingDown),
            Err(_) => {
                return Err(RouterError::ExpertTimeout(format!(
                    "{} did not answer layer {layer} within {:?}",
                    self.label, self.settings.timeout
                )));
            }
        };
        let (output, returned_rows) =
            tensor_codec::decode_rows_f32(Some(&output), width).map_err(|err| {
                RouterError::Internal(format!("{} returned a bad tensor: {err}", self.label))
            })?;
        if returned_rows != expected_rows {
            return Err(RouterError::Internal(format!(
                "{} returned {returned_rows} rows for {expected_rows}",
                self.label
            )));
        }
        in_flight.succeeded();
        Ok(output)
    }
}

/// An open Forward stream.
struct Stream {
    outbound: mpsc::Sender<ExpertBatch>,
    inbound: Streaming<ExpertResult>,
}

async fn open_stream(channel: &Channel) -> Result<Stream, tonic::Status> {
    let (outbound, receiver) = mpsc::channel(STREAM_QUEUE);
    let mut client = transport::expert_client(channel.clone());
    let inbound = client
        .forward(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    Ok(Stream { outbound, inbound })
}

async fn next_result(stream: &mut Option<Stream>) -> Option<Result<ExpertResult, tonic::Status>> {
    match stream {
        Some(stream) => stream.inbound.message().await.transpose(),
        None => std::future::pending().await,
    }
}

/// Owns the stream and the table of calls awaiting a result. When the
/// stream breaks, every pending call fails at once (naming the endpoint) and
/// the next call opens a new stream.
async fn run_actor(
    label: Arc<str>,
    channel: Channel,
    mut calls: mpsc::Receiver<Call>,
    stats: Arc<RouterStats>,
) {
    let mut stream: Option<Stream> = None;
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_id = 0u64;
    let unavailable = |why: String| RouterError::ExpertUnavailable(format!("{label}: {why}"));
    loop {
        tokio::select! {
            call = calls.recv() => {
                let Some(call) = call else { break };
                if stream.is_none() {
                    match open_stream(&channel).await {
                        Ok(opened) => stream = Some(opened),
                        Err(status) => {
                            let _ = call.reply.send(Err(unavailable(format!("cannot open a stream: {}", status.message()))));
                            continue;
                        }
                    }
                }
                next_id += 1;
                let batch = ExpertBatch { request_id: next_id, layer: call.layer, hidden: Some(call.hidden) };
                pending.insert(next_id, call.reply);
                stats.record_sent(batch.encoded_len());
                let sent = match &stream {
                    Some(open) => open.outbound.send(batch).await.is_ok(),
                    None => false,
                };
                if !sent {
                    stream = None;
                    fail_all(&mut pending, || unavailable("stream closed".into()));
                }
            }
            result = next_result(&mut stream) => match result {
                Some(Ok(message)) => {
                    stats.record_received(message.encoded_len());
                    match pending.remove(&message.request_id) {
                        Some(reply) => {
                            let _ = reply.send(outcome(&label, message.result));
                        }
                        None => tracing::warn!(%label, request_id = message.request_id, "a result for no pending call"),
                    }
                }
                Some(Err(status)) => {
                    tracing::warn!(%label, %status, "expert stream failed");
                    stream = None;
                    fail_all(&mut pending, || unavailable(format!("stream failed: {}", status.message())));
                }
                None => {
                    stream = None;
                    fail_all(&mut pending, || unavailable("the expert closed its stream".into()));
                }
            }
        }
    }
}

fn fail_all(pending: &mut HashMap<u64, Reply>, error: impl Fn() -> RouterError) {
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(error()));
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

/// Which endpoint serves each (expert, layer).
pub struct DistributedExperts {
    /// Per expert: the endpoints and the layers each serves.
    endpoints: Vec<Vec<(Range<usize>, EndpointClient)>>,
}

impl DistributedExperts {
    pub fn new(endpoints: Vec<Vec<(Range<usize>, EndpointClient)>>) -> Self {
        Self { endpoints }
    }

    /// The endpoint that takes a message for (`expert`, `layer`): the only
    /// one, or of several, the one the picker chooses by load.
    fn pick(&self, expert: usize, layer: usize) -> Option<&EndpointClient> {
        let candidates: Vec<&EndpointClient> = self
            .endpoints
            .get(expert)?
            .iter()
            .filter(|(layers, _)| layers.contains(&layer))
            .map(|(_, client)| client)
            .collect();
        if candidates.len() <= 1 {
            return candidates.first().copied();
        }
        let loads: Vec<_> = candidates.iter().map(|client| client.load.load()).collect();
        picker::pick(&loads, &mut rand::rng()).map(|index| candidates[index])
    }
}

impl ExpertBackend for DistributedExperts {
    async fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> Result<Vec<f32>, RouterError> {
        let endpoint = self.pick(expert, layer).ok_or_else(|| {
            RouterError::ExpertUnavailable(format!(
                "no endpoint serves expert {expert} at layer {layer}"
            ))
        })?;
        endpoint.forward(layer, rows).await
    }
}
