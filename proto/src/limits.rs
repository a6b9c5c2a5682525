//! What peers may make a server hold: the largest message it decodes, the
//! streams one connection may keep open, the connections it holds, and
//! for how long. Set per process from its flags and passed to
//! [`crate::transport`]'s server constructors, the one place where servers
//! are built.

use std::time::Duration;

/// HTTP/2 streams one connection may have open at once, by default. A
/// client that opens streams and never reads holds a running slot with
/// each (until `--stalled-client-timeout` cancels it); with this bound one
/// connection cannot take every slot of a router that runs 128 sequences.
/// A router needs one Forward stream per expert connection, plus health.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 32;

/// Connections a router holds at once, by default: clients (or the
/// gateways in front of them) beyond it wait to be accepted. Room for a
/// full queue (`--queue-capacity` 1024) of one-request clients.
pub const DEFAULT_ROUTER_MAX_CONNECTIONS: usize = 2048;

/// Connections an expert holds at once, by default: each router holds
/// one, and probes come and go.
pub const DEFAULT_EXPERT_MAX_CONNECTIONS: usize = 256;

/// How long a router keeps a client connection before asking the client
/// (HTTP/2 GOAWAY) to open a new one for its next requests, by default.
/// Streams running on it finish undisturbed; an idle connection closes at
/// once. At --max-connections, this is what makes room again: connections
/// that are merely held open leave, and clients waiting to connect take
/// their places in turn.
pub const DEFAULT_ROUTER_MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// A `--max-connection-age`: a duration (`5m`, `90s`), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionAge(pub Option<Duration>);

impl std::str::FromStr for ConnectionAge {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "off" {
            return Ok(Self(None));
        }
        match humantime::parse_duration(text) {
            Ok(age) if !age.is_zero() => Ok(Self(Some(age))),
            Ok(_) => Err(
                "a connection age of 0 would close every connection at once; use off for no limit"
                    .into(),
            ),
            Err(err) => Err(format!("{text:?}: {err} (expected e.g. 5m, or off)")),
        }
    }
}

/// Rows one Forward message may hold, by default: a router sends an expert
/// at most one row per token of a step, so this covers any
/// `--max-batch-tokens` up to it.
pub const DEFAULT_MAX_ROWS: usize = 8192;

/// Bytes a message carries besides its tensor's data: ids, the layer, the
/// shape, a trace parent.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// A server's bounds on what its peers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// The largest message the server decodes; a longer one is refused
    /// from its length prefix, before its body is buffered.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Connections held at once; more wait to be accepted.
    pub max_connections: usize,
    /// After this long a connection is asked to go (GOAWAY): its running
    /// streams finish, its next ones go on a new connection.
    pub max_connection_age: Option<Duration>,
}

impl ServerLimits {
    /// An expert's bounds: the largest message holds `max_rows` rows of
    /// `hidden_size` f32 values (the widest wire dtype).
    pub fn expert(
        max_rows: usize,
        hidden_size: usize,
        max_concurrent_streams: u32,
        max_connections: usize,
        max_connection_age: Option<Duration>,
    ) -> Self {
        Self {
            max_message_bytes: expert_message_bytes(max_rows, hidden_size),
            max_concurrent_streams,
            max_connections,
            max_connection_age,
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: crate::MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_connections: DEFAULT_ROUTER_MAX_CONNECTIONS,
            max_connection_age: Some(DEFAULT_ROUTER_MAX_CONNECTION_AGE),
        }
    }
}

/// The largest Forward message (or result) of `max_rows` rows of
/// `hidden_size` f32 values.
pub fn expert_message_bytes(max_rows: usize, hidden_size: usize) -> usize {
    max_rows
        .saturating_mul(hidden_size)
        .saturating_mul(std::mem::size_of::<f32>())
        .saturating_add(MESSAGE_OVERHEAD_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ages_parse_with_off_and_refuse_zero() {
        assert_eq!(
            "5m".parse(),
            Ok(ConnectionAge(Some(Duration::from_secs(300))))
        );
        assert_eq!("off".parse(), Ok(ConnectionAge(None)));
        assert!("0s".parse::<ConnectionAge>().unwrap_err().contains("off"));
        assert!(
            "soon"
                .parse::<ConnectionAge>()
                .unwrap_err()
                .contains("soon")
        );
    }

    #[test]
    fn an_expert_takes_max_rows_of_f32_and_a_little_more() {
        let limits = ServerLimits::expert(8192, 4096, 32, 256, None);
        assert_eq!(limits.max_message_bytes, 8192 * 4096 * 4 + 64 * 1024);
        assert_eq!(expert_message_bytes(usize::MAX, 2), usize::MAX);
    }
}
