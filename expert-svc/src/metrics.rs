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
    errors: Counter<u64>,
}

impl ExpertMetrics {
    pub fn new(meter: &Meter, expert: usize) -> Self {
        let label = KeyValue::new("expert", expert as i64);
        let bound = |spec| moe_telemetry::histogram(meter, spec).bind(std::slice::from_ref(&label));
        let busy =
            moe_telemetry::counter(meter, &names::REPLICA_BUSY).bind(std::slice::from_ref(&label));
        busy.add(0.0);
        Self {
            message_rows: bound(&names::REPLICA_MESSAGE_ROWS),
            product_rows: bound(&names::REPLICA_PRODUCT_ROWS),
            queue_wait: bound(&names::REPLICA_QUEUE_WAIT),
            compute: bound(&names::REPLICA_COMPUTE_DURATION),
            busy,
            errors: moe_telemetry::u64_counter(meter, &names::REPLICA_ERRORS),
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

    /// One product of `rows` rows took `took`.
    pub fn product(&self, rows: usize, took: Duration) {
        self.product_rows.record(rows as f64);
        self.compute.record(took.as_secs_f64());
        self.busy.add(took.as_secs_f64());
    }

    /// A message was answered with an error of `code`.
    pub fn error(&self, code: tonic::Code) {
        self.errors.add(
            1,
            &[
                self.expert.clone(),
                KeyValue::new("code", moe_telemetry::grpc_code_name(code)),
            ],
        );
    }
}
