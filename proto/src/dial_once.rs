//! A channel that dials its address once. tonic's `Channel` reconnects by
//! itself when its connection breaks; a router that checked an expert
//! (`Describe`) on one connection must not have its messages carried, on a
//! silent reconnection, to whatever process listens at that address next.
//! On this channel a second dial fails, so every call after the connection
//! is gone fails too, and the caller checks a new connection instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Uri};

use tokio_rustls::rustls::pki_types::ServerName;

use crate::tls::{self, ClientTls};
use crate::transport::endpoint;

/// TLS for one dial: the client's config, and the name the server's
/// certificate must carry.
pub struct DialTls {
    pub config: Arc<ClientTls>,
    pub name: ServerName<'static>,
}

impl DialTls {
    /// TLS to `uri` with the certificate name `name`, or else the
    /// endpoint's host (`localhost` for a Unix socket).
    pub fn new(config: Arc<ClientTls>, uri: &str, name: Option<&str>) -> Result<Self, String> {
        let host = match name {
            Some(name) => name,
            None => host_of(uri),
        };
        let name = tls::server_name(host)
            .map_err(|_| format!("{host:?} cannot be checked against a TLS certificate"))?;
        Ok(Self { config, name })
    }
}

/// The host of `http(s)://HOST:PORT` or `HOST:PORT`; `localhost` for
/// `unix:PATH`.
pub fn host_of(uri: &str) -> &str {
    if uri.starts_with("unix:") {
        return "localhost";
    }
    let authority = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Connects to `uri` (`http://HOST:PORT`, `https://HOST:PORT` or
/// `unix:PATH`) with [`endpoint`]'s settings, on a channel that never
/// reconnects; over TLS when `tls` is given (whatever the scheme).
pub async fn connect_once(
    uri: &str,
    tls: Option<DialTls>,
) -> Result<Channel, tonic::transport::Error> {
    // TLS runs in the connector; tonic must not add its own for https.
    let uri = match uri.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => uri.to_owned(),
    };
    let uri = uri.as_str();
    let target = match uri.strip_prefix("unix:") {
        Some(path) => Target::Unix(path.trim_start_matches("//").to_owned()),
        None => Target::Tcp(
            uri.split_once("://")
                .map_or(uri, |(_, rest)| rest)
                .trim_end_matches('/')
                .to_owned(),
        ),
    };
    let connector = DialOnce {
        target: Arc::new(target),
        tls: tls.map(Arc::new),
        dialed: Arc::default(),
    };
    endpoint(uri)?.connect_with_connector(connector).await
}

enum Target {
    /// `HOST:PORT`.
    Tcp(String),
    Unix(String),
}

#[derive(Clone)]
struct DialOnce {
    target: Arc<Target>,
    tls: Option<Arc<DialTls>>,
    dialed: Arc<AtomicBool>,
}

impl tower::Service<Uri> for DialOnce {
    type Response = TokioIo<Connection>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let first = !self.dialed.swap(true, Ordering::AcqRel);
        let target = self.target.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            if !first {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the checked connection is gone; this channel does not dial again",
                ));
            }
            let connection = match &*target {
                Target::Tcp(address) => {
                    let stream = TcpStream::connect(address.as_str()).await?;
                    stream.set_nodelay(true)?;
                    Connection::Tcp(stream)
                }
                Target::Unix(path) => Connection::Unix(UnixStream::connect(path).await?),
            };
            let connection = match tls.as_deref() {
                Some(DialTls { config, name }) => Connection::Tls(Box::new(
                    tls::connect(config, name.clone(), connection).await?,
                )),
                None => connection,
            };
            Ok(TokioIo::new(connection))
        })
    }
}

/// A TCP or Unix stream, or TLS over one.
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<Connection>>),
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Self::Unix(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::transport::{incoming, server_with_health_and_reflection};

    /// Serves gRPC health on `address` in a runtime of its own: shutting
    /// that runtime down drops the server and every connection at once, as
    /// a killed process would.
    fn serve(address: std::net::SocketAddr) -> tokio::runtime::Runtime {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind(address).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (_health, server) = server_with_health_and_reflection();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            server.serve_with_incoming(incoming(listener)).await
        });
        runtime
    }

    async fn check(channel: &Channel) -> Result<(), tonic::Status> {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        HealthClient::new(channel.clone())
            .check(request)
            .await
            .map(drop)
    }

    #[tokio::test]
    async fn a_channel_never_reaches_the_next_process_at_its_address() {
        let address = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let first = serve(address);
        let channel = connect_once(&format!("http://{address}"), None)
            .await
            .unwrap();
        check(&channel).await.expect("the first server answers");

        first.shutdown_background();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let second = serve(address);
        let fresh = connect_once(&format!("http://{address}"), None)
            .await
            .unwrap();
        check(&fresh)
            .await
            .expect("a new channel reaches the second server");
        for _ in 0..3 {
            assert!(
                check(&channel).await.is_err(),
                "the old channel reached the second server"
            );
        }
        second.shutdown_background();
    }
}
