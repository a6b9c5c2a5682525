//! What one peer may make a server hold: the largest message it decodes
//! and the streams one connection may keep open. Set per process from its
//! flags and passed to [`crate::transport`]'s server constructors, the one
//! place where servers are built.

/// HTTP/2 streams one connection may have open at once, by default. A
/// client that opens streams and never reads holds a running slot with
/// each (until `--stalled-client-timeout` cancels it); with this bound one
/// connection cannot take every slot of a router that runs 128 sequences.
/// A router needs one Forward stream per expert connection, plus health.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 32;

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
}

impl ServerLimits {
    /// An expert's bounds: the largest message holds `max_rows` rows of
    /// `hidden_size` f32 values (the widest wire dtype).
    pub fn expert(max_rows: usize, hidden_size: usize, max_concurrent_streams: u32) -> Self {
        Self {
            max_message_bytes: expert_message_bytes(max_rows, hidden_size),
            max_concurrent_streams,
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: crate::MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
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
    fn an_expert_takes_max_rows_of_f32_and_a_little_more() {
        let limits = ServerLimits::expert(8192, 4096, 32);
        assert_eq!(limits.max_message_bytes, 8192 * 4096 * 4 + 64 * 1024);
        assert_eq!(expert_message_bytes(usize::MAX, 2), usize::MAX);
    }
}
