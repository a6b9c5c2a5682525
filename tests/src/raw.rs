//! A raw HTTP/2 and TCP peer for hostile-input tests: it sends what a gRPC
//! library would never send (wrong framing, wrong content types, windows
//! that never open, bytes one at a time) and reports what came back.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// The HTTP/2 connection preface a client starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `HOST:PORT` of an `http://HOST:PORT` URI.
pub fn authority(uri: &str) -> &str {
    uri.trim_start_matches("http://").trim_end_matches('/')
}

/// `message` in gRPC's length-prefixed framing (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(message.len() + 5);
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(message);
    framed.freeze()
}

/// One HTTP/2 frame: its 9-byte header and `payload`.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// A raw HTTP/2 client connection; clones share it.
#[derive(Clone)]
pub struct RawH2 {
    send: SendRequest<Bytes>,
}

/// What a gRPC call answered: the HTTP status and, from the headers
/// (trailers-only) or the trailers, the gRPC status.
#[derive(Debug)]
pub struct Answer {
    pub http: u16,
    pub code: Option<Code>,
    pub message: String,
    pub data_bytes: usize,
}

impl Answer {
    /// Whether the server refused (an HTTP or gRPC error).
    pub fn is_error(&self) -> bool {
        self.http != 200 || self.code.is_some_and(|code| code != Code::Ok)
    }
}

impl RawH2 {
    /// Connects to `addr` (`HOST:PORT`) with `window` bytes of receive
    /// window per stream (0: the server cannot send any data until a
    /// WINDOW_UPDATE, which this client never sends unless it reads).
    pub async fn connect(addr: &str, window: u32) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connects");
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Self { send }
    }

    /// The streams the server lets this connection open at once.
    pub fn max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Opens a POST stream to `path` with `content_type`; returns the
    /// response's future and the request body's sender.
    pub async fn open(
        &mut self,
        path: &str,
        content_type: &str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        let request = http::Request::post(format!("http://localhost{path}"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(())
            .expect("a valid request");
        let mut send = self.send.clone().ready().await?;
        send.send_request(request, false)
    }

    /// Sends `body` to `path` and reads the whole answer.
    pub async fn call(&mut self, path: &str, content_type: &str, body: Bytes) -> Answer {
        let (response, mut stream) = self.open(path, content_type).await.expect("stream opens");
        // A server may answer from the headers alone (a wrong content type,
        // an unknown method) and close the stream before the body goes
        // out (h2 then refuses the body: an inactive stream). The answer
        // is what the caller checks; a broken connection shows there too.
        let _ = stream.send_data(body, true);
        read_answer(response).await
    }
}

/// Reads a response to its end, giving its flow-control window back.
pub async fn read_answer(response: h2::client::ResponseFuture) -> Answer {
    let response = response.await.expect("a response");
    let http = response.status().as_u16();
    let (parts, mut body) = response.into_parts();
    let mut answer = Answer {
        http,
        code: None,
        message: String::new(),
        data_bytes: 0,
    };
    let mut status_from = |headers: &http::HeaderMap| {
        if let Some(status) = tonic::Status::from_header_map(headers) {
            answer.code = Some(status.code());
            answer.message = status.message().to_owned();
        }
    };
    status_from(&parts.headers);
    let mut data_bytes = 0;
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        data_bytes += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if let Ok(Some(trailers)) = body.trailers().await {
        status_from(&trailers);
    }
    answer.data_bytes = data_bytes;
    answer
}

/// What a server did with bytes written to it on a fresh TCP connection.
#[derive(Debug, PartialEq, Eq)]
pub enum TcpOutcome {
    /// It answered something (a GOAWAY, an HTTP/1 error) and closed.
    AnsweredAndClosed,
    /// It closed without a word.
    Closed,
}

/// Writes `bytes` (then closes the writing half) and waits for the server
/// to close the connection; panics if it holds it open for `patience`.
pub async fn write_raw(addr: &str, bytes: &[u8], patience: Duration) -> TcpOutcome {
    let mut tcp = TcpStream::connect(addr).await.expect("connects");
    // The server may close before taking everything: that is a refusal too.
    let _ = tcp.write_all(bytes).await;
    let _ = tcp.shutdown().await;
    let mut answered = 0;
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answered += n,
            }
        }
    };
    tokio::time::timeout(patience, read)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{addr} held a connection open after {} bad bytes",
                bytes.len()
            )
        });
    if answered > 0 {
        TcpOutcome::AnsweredAndClosed
    } else {
        TcpOutcome::Closed
    }
}

/// Writes `bytes` one at a time, `gap` apart (a slowloris peer), keeping
/// the connection open afterwards until the returned stream is dropped.
pub async fn trickle(addr: &str, bytes: &[u8], gap: Duration) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    for byte in bytes {
        tcp.write_all(&[*byte]).await?;
        tokio::time::sleep(gap).await;
    }
    Ok(tcp)
}

/// A process's resident memory in bytes (Linux), from `/proc`.
pub fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}
