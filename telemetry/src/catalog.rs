//! Every metric moe-serve exports, in one list: name, kind, unit, labels,
//! buckets and meaning. The instruments are built from these entries and
//! the README's metrics reference is generated from them, so the names an
//! operator reads are the names the code records.

/// What kind of instrument a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Which process records a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Router,
    Expert,
}

/// One metric: how the code records it and how Prometheus shows it.
#[derive(Debug, Clone, Copy)]
pub struct MetricSpec {
    /// The OpenTelemetry name (dots); Prometheus's is [`MetricSpec::prometheus_name`].
    pub name: &'static str,
    pub kind: Kind,
    /// UCUM, as OpenTelemetry wants it: `s`, `1`, or an annotation like `{row}`.
    pub unit: &'static str,
    pub labels: &'static [&'static str],
    /// Histogram bucket bounds, chosen for the unit (never the SDK's default).
    pub buckets: &'static [f64],
    pub service: Service,
    pub help: &'static str,
}

impl MetricSpec {
    /// The name Prometheus scrapes: dots become underscores, a unit `s`
    /// adds `_seconds`, `1` adds `_ratio`, counters end in `_total`
    /// (what opentelemetry-prometheus does).
    pub fn prometheus_name(&self) -> String {
        let mut name = self.name.replace('.', "_");
        match self.unit {
            "s" => name.push_str("_seconds"),
            "1" => name.push_str("_ratio"),
            _ => {}
        }
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }
}

/// Seconds, from 1 ms (an expert call at decode) to a minute (a long
/// request).
pub const SECONDS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// Counts of rows or tokens, from 1 (one decode row) to a long prefill.
pub const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

const NONE: &[f64] = &[];

macro_rules! spec {
    ($service:ident, $name:literal, $kind:ident, $unit:literal, [$($label:literal),*], $buckets:expr, $help:literal) => {
        MetricSpec {
            name: $name,
            kind: Kind::$kind,
            unit: $unit,
            labels: &[$($label),*],
            buckets: $buckets,
            service: Service::$service,
            help: $help,
        }
    };
}

pub const TIME_TO_FIRST_TOKEN: MetricSpec = spec!(
    Router,
    "gen_ai.server.time_to_first_token",
    Histogram,
    "s",
    [],
    SECONDS,
    "Time from a request's arrival to its first generated token."
);
pub const TIME_PER_OUTPUT_TOKEN: MetricSpec = spec!(
    Router,
    "gen_ai.server.time_per_output_token",
    Histogram,
    "s",
    [],
    SECONDS,
    "Time between two generated tokens of a request (inter-token latency)."
);
pub const REQUEST_DURATION: MetricSpec = spec!(
    Router,
    "gen_ai.server.request.duration",
    Histogram,
    "s",
    [],
    SECONDS,
    "Time from a request's arrival to its last message."
);
pub const TOKEN_USAGE: MetricSpec = spec!(
    Router,
    "gen_ai.server.token.usage",
    Histogram,
    "{token}",
    ["gen_ai.token.type"],
    COUNTS,
    "Tokens per finished request, by type: input (prompt) or output (generated)."
);
pub const TOKENS: MetricSpec = spec!(
    Router,
    "moe.tokens",
    Counter,
    "{token}",
    ["type"],
    NONE,
    "Tokens run through the model, counted per step: prompt (prefill) or generated (one decode token per generated token after the first, which comes from the prefill)."
);
pub const REQUESTS: MetricSpec = spec!(
    Router,
    "moe.requests",
    Counter,
    "{request}",
    ["finish_reason", "code"],
    NONE,
    "Finished requests by finish reason (length, stop, eos, cancelled, error) and gRPC code."
);
pub const RUNNING: MetricSpec = spec!(
    Router,
    "moe.sequences.running",
    Gauge,
    "{sequence}",
    [],
    NONE,
    "Sequences in the running batch."
);
pub const WAITING: MetricSpec = spec!(
    Router,
    "moe.sequences.waiting",
    Gauge,
    "{sequence}",
    [],
    NONE,
    "Admitted sequences waiting for a slot or for KV-cache room."
);
pub const KV_CACHE_USAGE: MetricSpec = spec!(
    Router,
    "moe.kv_cache.usage",
    Gauge,
    "1",
    [],
    NONE,
    "Fraction of the KV cache's token slots in use (0 to 1)."
);
pub const STEP_DURATION: MetricSpec = spec!(
    Router,
    "moe.step.duration",
    Histogram,
    "s",
    [],
    SECONDS,
    "Time one scheduler step took, every layer included."
);
pub const STEP_TOKENS: MetricSpec = spec!(
    Router,
    "moe.step.tokens",
    Histogram,
    "{token}",
    [],
    COUNTS,
    "Tokens in one scheduler step (decode tokens plus prompt chunks)."
);
pub const EXPERT_ROWS: MetricSpec = spec!(
    Router,
    "moe.expert.rows",
    Counter,
    "{row}",
    ["expert", "layer"],
    NONE,
    "Rows the gate routed to an expert at a layer (each token counts once per expert it picks)."
);
pub const EXPERT_CALL_DURATION: MetricSpec = spec!(
    Router,
    "moe.expert.call.duration",
    Histogram,
    "s",
    ["expert", "replica"],
    SECONDS,
    "Time from sending a message to a replica to its answer, as the router sees it."
);
pub const EXPERT_IN_FLIGHT_ROWS: MetricSpec = spec!(
    Router,
    "moe.expert.in_flight_rows",
    Gauge,
    "{row}",
    ["expert", "replica"],
    NONE,
    "Rows sent to a replica and not yet answered."
);
pub const EXPERT_REPLICAS: MetricSpec = spec!(
    Router,
    "moe.expert.replicas",
    Gauge,
    "{replica}",
    ["expert", "state"],
    NONE,
    "Replicas of an expert by state: ready, draining or down (connecting, refused and lost count as down)."
);
pub const EXPERT_DESIRED_REPLICAS: MetricSpec = spec!(
    Router,
    "moe.expert.desired_replicas",
    Gauge,
    "{replica}",
    ["expert"],
    NONE,
    "Replicas the expert should have: smoothed routed rows per second over what one replica computes per busy second at the target utilisation (the autoscaling signal)."
);
pub const EXPERT_RESENDS: MetricSpec = spec!(
    Router,
    "moe.expert.resends",
    Counter,
    "{message}",
    ["expert", "reason"],
    NONE,
    "Messages sent again to another replica: after a failure or timeout (retry) or because the first was slow (hedge)."
);
pub const EXPERT_FAILOVERS: MetricSpec = spec!(
    Router,
    "moe.expert.failovers",
    Counter,
    "{replica}",
    ["expert"],
    NONE,
    "Times a ready replica of the expert was lost (its stream broke or it stopped answering health)."
);
pub const EXPERT_REROUTED_ROWS: MetricSpec = spec!(
    Router,
    "moe.expert.rerouted_rows",
    Counter,
    "{row}",
    ["expert"],
    NONE,
    "Rows meant for this expert that went to next-best experts while it had no ready replica (--on-expert-down reroute)."
);
pub const EXPERT_IMBALANCE: MetricSpec = spec!(
    Router,
    "moe.expert.imbalance",
    Gauge,
    "1",
    [],
    NONE,
    "Most rows routed to one expert over the mean per expert, over the last minute (1 is perfectly even)."
);

pub const REPLICA_MESSAGE_ROWS: MetricSpec = spec!(
    Expert,
    "moe.expert.replica.message.rows",
    Histogram,
    "{row}",
    ["expert"],
    COUNTS,
    "Rows in one message a replica received."
);
pub const REPLICA_PRODUCT_ROWS: MetricSpec = spec!(
    Expert,
    "moe.expert.replica.product.rows",
    Histogram,
    "{row}",
    ["expert"],
    COUNTS,
    "Rows in one product (the messages of a layer stacked into one pass)."
);
pub const REPLICA_QUEUE_WAIT: MetricSpec = spec!(
    Expert,
    "moe.expert.replica.queue_wait",
    Histogram,
    "s",
    ["expert"],
    SECONDS,
    "Time a message waited between arriving and its product starting."
);
pub const REPLICA_COMPUTE_DURATION: MetricSpec = spec!(
    Expert,
    "moe.expert.replica.compute.duration",
    Histogram,
    "s",
    ["expert"],
    SECONDS,
    "Time one product took to compute."
);
pub const REPLICA_BUSY: MetricSpec = spec!(
    Expert,
    "moe.expert.replica.busy",
    Counter,
    "s",
    ["expert"],
    NONE,
    "Seconds spent computing products; its rate is the replica's busy fraction."
);
pub const REPLICA_ERRORS: MetricSpec = spec!(
    Expert,
    "moe.expert.replica.errors",
    Counter,
    "{error}",
    ["expert", "code"],
    NONE,
    "Messages answered with an error, by gRPC code."
);

/// Every metric, router's first.
pub const ALL: &[MetricSpec] = &[
    TIME_TO_FIRST_TOKEN,
    TIME_PER_OUTPUT_TOKEN,
    REQUEST_DURATION,
    TOKEN_USAGE,
    TOKENS,
    REQUESTS,
    RUNNING,
    WAITING,
    KV_CACHE_USAGE,
    STEP_DURATION,
    STEP_TOKENS,
    EXPERT_ROWS,
    EXPERT_CALL_DURATION,
    EXPERT_IN_FLIGHT_ROWS,
    EXPERT_REPLICAS,
    EXPERT_DESIRED_REPLICAS,
    EXPERT_RESENDS,
    EXPERT_FAILOVERS,
    EXPERT_REROUTED_ROWS,
    EXPERT_IMBALANCE,
    REPLICA_MESSAGE_ROWS,
    REPLICA_PRODUCT_ROWS,
    REPLICA_QUEUE_WAIT,
    REPLICA_COMPUTE_DURATION,
    REPLICA_BUSY,
    REPLICA_ERRORS,
];

/// The metrics reference as a Markdown table, as the README carries it.
pub fn markdown_reference() -> String {
    let mut table = String::from(
        "| metric (Prometheus) | type | unit | labels | from | meaning |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for spec in ALL {
        let labels = if spec.labels.is_empty() {
            "–".to_owned()
        } else {
            spec.labels
                .iter()
                .map(|label| format!("`{}`", label.replace('.', "_")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let service = match spec.service {
            Service::Router => "router",
            Service::Expert => "expert",
        };
        table.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} | {} |\n",
            spec.prometheus_name(),
            spec.kind.as_str(),
            spec.unit,
            labels,
            service,
            spec.help
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_follow_the_exporter_rules() {
        assert_eq!(
            TIME_TO_FIRST_TOKEN.prometheus_name(),
            "gen_ai_server_time_to_first_token_seconds"
        );
        assert_eq!(EXPERT_ROWS.prometheus_name(), "moe_expert_rows_total");
        assert_eq!(
            REPLICA_BUSY.prometheus_name(),
            "moe_expert_replica_busy_seconds_total"
        );
        assert_eq!(KV_CACHE_USAGE.prometheus_name(), "moe_kv_cache_usage_ratio");
    }

    #[test]
    fn names_are_unique_and_histograms_have_buckets() {
        let mut names: Vec<_> = ALL.iter().map(|spec| spec.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for spec in ALL {
            assert_eq!(
                spec.kind == Kind::Histogram,
                !spec.buckets.is_empty(),
                "{}",
                spec.name
            );
            assert!(spec.buckets.windows(2).all(|pair| pair[0] < pair[1]));
        }
    }
}

#[cfg(test)]
mod readme {
    /// The README's metrics reference is this catalog's, so that the two
    /// cannot drift apart. To update it after changing the catalog:
    /// `MOE_WRITE_README=1 cargo test -p moe-telemetry readme`.
    #[test]
    fn the_readmes_metrics_reference_is_the_catalog() {
        const START: &str =
            "<!-- metrics-reference:start (generated from telemetry/src/catalog.rs) -->\n";
        const END: &str = "<!-- metrics-reference:end -->";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (before, rest) = readme
            .split_once(START)
            .expect("the README has the start marker");
        let (current, after) = rest.split_once(END).expect("the README has the end marker");
        let generated = super::markdown_reference();
        if std::env::var_os("MOE_WRITE_README").is_some() {
            std::fs::write(&path, format!("{before}{START}{generated}{END}{after}")).unwrap();
            return;
        }
        assert_eq!(
            current, generated,
            "the README's metrics reference differs from the catalog: \
             MOE_WRITE_README=1 cargo test -p moe-telemetry readme"
        );
    }
}
