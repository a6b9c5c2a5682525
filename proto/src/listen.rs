//! Where a service listens: a TCP address, or a Unix domain socket.
//!
//! Both carry the same gRPC. A Unix socket suits peers that share a machine
//! (or, on Kubernetes, a pod's volume): no port to expose or firewall, and
//! file permissions decide who may connect. Clients dial it as `unix:PATH`,
//! which tonic connects to natively.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

use crate::tls::{self, ServerTls};
use crate::{connection_cap, transport};

/// A `--listen` value: `HOST:PORT`, or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// What a client dials: `http://HOST:PORT` or `unix:PATH` (tonic
    /// connects to both).
    pub fn uri(&self) -> String {
        match self {
            Self::Tcp(addr) => format!("http://{addr}"),
            Self::Unix(_) => self.to_string(),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!(
                    "{text:?}: unix: needs a socket path, e.g. unix:/run/moe/expert-0.sock"
                ));
            }
            return Ok(Self::Unix(path.into()));
        }
        text.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{text:?}: expected HOST:PORT (e.g. 0.0.0.0:50061) or unix:PATH"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener of either kind, and optionally TLS on top.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
    /// A TCP or Unix listener whose connections are served after a TLS
    /// handshake ([`tls::accept`]).
    Tls(Box<Listener>, Arc<ServerTls>),
}

impl Listener {
    /// Binds `addr`. A Unix socket file left behind by a process that is
    /// gone (nothing accepts on it) is replaced; one that is in use is not.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                Ok(Self::Unix(listener, SocketFile(path.clone())))
            }
        }
    }

    /// The bound address, with the port the system picked for port 0.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr().map(ListenAddr::Tcp),
            Self::Unix(_, file) => Ok(ListenAddr::Unix(file.0.clone())),
            Self::Tls(inner, _) => inner.local_addr(),
        }
    }

    /// This listener, serving TLS with `tls` when given.
    pub fn with_tls(self, tls: Option<Arc<ServerTls>>) -> Self {
        match (self, tls) {
            (Self::Tls(inner, _), Some(tls)) => Self::Tls(inner, tls),
            (plain, Some(tls)) => Self::Tls(Box::new(plain), tls),
            (listener, None) => listener,
        }
    }

    /// Serves `router` on this listener, holding at most `max_connections`
    /// connections at once ([`connection_cap`]), until `stop` resolves and
    /// the streams in flight end. A Unix socket's file is removed
    /// afterwards (or when the returned future is dropped).
    pub async fn serve(
        self,
        router: Router,
        max_connections: usize,
        stop: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        match self {
            Self::Tcp(listener) => {
                let accepted =
                    connection_cap::capped(transport::incoming(listener), max_connections);
                router.serve_with_incoming_shutdown(accepted, stop).await
            }
            Self::Unix(listener, _file) => {
                let accepted =
                    connection_cap::capped(UnixListenerStream::new(listener), max_connections);
                router.serve_with_incoming_shutdown(accepted, stop).await
            }
            // Capped before the handshake, which costs the server too.
            Self::Tls(inner, config) => match *inner {
                Self::Tcp(listener) => {
                    let accepted = tls::accept(
                        connection_cap::capped(transport::incoming(listener), max_connections),
                        config,
                    );
                    router.serve_with_incoming_shutdown(accepted, stop).await
                }
                Self::Unix(listener, _file) => {
                    let accepted = tls::accept(
                        connection_cap::capped(UnixListenerStream::new(listener), max_connections),
                        config,
                    );
                    router.serve_with_incoming_shutdown(accepted, stop).await
                }
                Self::Tls(..) => unreachable!("with_tls never nests TLS"),
            },
        }
    }
}

/// A Unix socket's path, removed when dropped so that a stopped service
/// leaves nothing behind.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is a socket another process listens on", path.display()),
        )),
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        // Not a socket, or not ours to judge: let bind say what is wrong.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_and_names_the_mistake() {
        assert_eq!(
            "127.0.0.1:0".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/moe/e.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/moe/e.sock".into()))
        );
        assert_eq!(
            "unix:///run/moe/e.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/moe/e.sock".into()))
        );
        let err = "localhost".parse::<ListenAddr>().unwrap_err();
        assert!(
            err.contains("HOST:PORT") && err.contains("unix:PATH"),
            "{err}"
        );
        assert!(
            "unix:"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("socket path")
        );
    }

    #[test]
    fn uri_and_display_round_trip() {
        let unix = ListenAddr::Unix("/tmp/e.sock".into());
        assert_eq!(unix.uri(), "unix:/tmp/e.sock");
        assert_eq!(unix.to_string().parse::<ListenAddr>(), Ok(unix));
        let tcp: ListenAddr = "10.0.0.1:50061".parse().unwrap();
        assert_eq!(tcp.uri(), "http://10.0.0.1:50061");
        assert_eq!(tcp.to_string().parse::<ListenAddr>(), Ok(tcp));
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.sock");
        // A process that died without cleaning up leaves its socket file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let addr = ListenAddr::Unix(path.clone());
        let live = Listener::bind(&addr).await.unwrap();
        let err = Listener::bind(&addr).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        assert!(!path.exists(), "dropping the listener removes its file");
    }
}
