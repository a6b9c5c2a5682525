//! The replica's OpenTelemetry instruments, every one bound to this
//! process's expert label at start: recording a message or a product looks
//! up and allocates nothing.

use std::time::Duration;

use moe_telemetry::catalog as names;
use moe_telemetry::{KeyValue, Meter};
use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter};

pub struct ExpertMetrics {
    expert: KeyValue,
    message_rows: BoundHistogram<f64>,
    product_rows: BoundHistogram<f64>,
    queue_wait: BoundHistogram<f64>,
    compute: BoundHistogram<f64>,
    busy: BoundCounter<f64>,
    /// The codes a replica answers with, bound (and exported at 0) from
    /// the start, so that an error rate reads 0 rather than nothing.
    errors_by_code: Vec<(tonic::Code, BoundCounter<u64>)>,
    errors: Counter<u64>,
}

/// The codes an [`crate::ExpertError`] maps to.
const ERROR_CODES: [tonic::Code; 3] = [
    tonic::Code::InvalidArgument,
    tonic::Code::ResourceExhausted,
    tonic::Code::Internal,
];

impl ExpertMetrics {
    pub fn new(meter: &Meter, expert: usize) -> Self {
        let label = KeyValue::new("expert", expert as i64);
        let bound = |spec| moe_telemetry::histogram(meter, spec).bind(std::slice::from_ref(&label));
        let busy =
            moe_telemetry::counter(meter, &names::REPLICA_BUSY).bind(std::slice::from_ref(&label));
        busy.add(0.0);
        let errors = moe_telemetry::u64_counter(meter, &names::REPLICA_ERRORS);
        let errors_by_code = ERROR_CODES
            .map(|code| {
                let counter = errors.bind(&[
                    label.clone(),
                    KeyValue::new("code", moe_telemetry::grpc_code_name(code)),
                ]);
                counter.add(0);
                (code, counter)
            })
            .into();
        Self {
            message_rows: bound(&names::REPLICA_MESSAGE_ROWS),
            product_rows: bound(&names::REPLICA_PRODUCT_ROWS),
            queue_wait: bound(&names::REPLICA_QUEUE_WAIT),
            compute: bound(&names::REPLICA_COMPUTE_DURATION),
            busy,
            errors_by_code,
            errors,
            expert: label,
        }
    }

    /// Metrics that go nowhere (unit tests and benchmarks).
    pub fn detached(expert: usize) -> Self {
        Self::new(&opentelemetry::global::meter("detached"), expert)
    }

    pub fn message(&self, rows: usize) {
        self.message_rows.record(rows as f64);
    }

    /// A message waited `waited` in the queue before its product started.
    pub fn waited(&self, waited: Duration) {
        self.queue_wait.record(waited.as_secs_f64());
    }

    /// One product of `rows` rows took `took`, of which `busy` was not
    /// already counted as busy (by a product running at the same time).
    pub fn product(&self, rows: usize, took: Duration, busy: Duration) {
        self.product_rows.record(rows as f64);
        self.compute.record(took.as_secs_f64());
        self.busy.add(busy.as_secs_f64());
    }

    /// A message was answered with an error of `code`.
    pub fn error(&self, code: tonic::Code) {
        if let Some((_, counter)) = self.errors_by_code.iter().find(|(bound, _)| *bound == code) {
            counter.add(1);
            return;
        }
        self.errors.add(
            1,
            &[
                self.expert.clone(),
                KeyValue::new("code", moe_telemetry::grpc_code_name(code)),
            ],
        );
    }
}
