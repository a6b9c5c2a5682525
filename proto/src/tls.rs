//! TLS for every moe-serve hop, with rustls (ring; no OpenSSL): a server's
//! certificate (and, for mutual TLS, the CA its clients' certificates must
//! come from), and a client's trusted CA (and the certificate it presents).
//!
//! Each is built from PEM files and rebuilt when they change
//! ([`Reloading`]): a server takes the config current when a connection is
//! accepted, a client the one current when it dials, so a rotated
//! certificate serves new connections while open ones keep their session.
//! tonic's own `ServerTlsConfig` is fixed once built, which is why servers
//! accept TLS here ([`accept`]) and hand tonic finished connections.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::reload::{ReadError, Reloading};

pub use tokio_rustls::rustls;
pub use tokio_rustls::rustls::pki_types::InvalidDnsNameError;

/// What is wrong with a TLS file or setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{0}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub identity: Identity,
    /// Mutual TLS: only clients with a certificate this CA signed may
    /// connect. None: any client may (the public API, where bearer tokens
    /// authenticate).
    pub client_ca: Option<PathBuf>,
}

/// A client's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signs the servers' certificates (the only one trusted).
    pub ca: PathBuf,
    /// The certificate presented to servers that ask for one.
    pub identity: Option<Identity>,
}

/// A server's TLS, rebuilt when its files change.
pub type ServerTls = Reloading<ServerConfig>;
/// A client's TLS, rebuilt when its files change.
pub type ClientTls = Reloading<ClientConfig>;

/// The one protocol both sides speak over TLS.
const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads `files` (failing if they are unusable) and watches them.
pub fn server(files: ServerTlsFiles) -> Result<Arc<ServerTls>, TlsError> {
    let mut paths = vec![files.identity.cert.clone(), files.identity.key.clone()];
    paths.extend(files.client_ca.clone());
    Reloading::start("TLS server certificate", paths, move |contents| {
        server_config(&files, contents)
    })
}

/// Loads `files` (failing if they are unusable) and watches them.
pub fn client(files: ClientTlsFiles) -> Result<Arc<ClientTls>, TlsError> {
    let mut paths = vec![files.ca.clone()];
    if let Some(identity) = &files.identity {
        paths.extend([identity.cert.clone(), identity.key.clone()]);
    }
    Reloading::start("TLS client certificate", paths, move |contents| {
        client_config(&files, contents)
    })
}

fn server_config(files: &ServerTlsFiles, contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&files.identity.cert, &contents[0])?;
    let key = private_key(&files.identity.key, &contents[1])?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(roots(ca, &contents[2])?);
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // Checks that the key is the certificate's: a rotation caught between
    // its two files fails here and is retried at the next poll.
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

fn client_config(files: &ClientTlsFiles, contents: &[Vec<u8>]) -> Result<ClientConfig, TlsError> {
    let roots = roots(&files.ca, &contents[0])?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match &files.identity {
        Some(identity) => builder.with_client_auth_cert(
            certificates(&identity.cert, &contents[1])?,
            private_key(&identity.key, &contents[2])?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Invalid {
            path: path.to_owned(),
            problem: err.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(chain)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(path.to_owned()),
        err => TlsError::Invalid {
            path: path.to_owned(),
            problem: err.to_string(),
        },
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path, pem)? {
        roots.add(certificate).map_err(|err| TlsError::Invalid {
            path: path.to_owned(),
            problem: format!("not a usable CA certificate: {err}"),
        })?;
    }
    Ok(roots)
}

/// The name a server's certificate must carry for a client dialling
/// `host` (a DNS name or an IP address, as in the endpoint).
pub fn server_name(host: &str) -> Result<ServerName<'static>, InvalidDnsNameError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
}

/// Runs the TLS handshake as a client of `tls` over `stream`.
pub async fn connect<IO>(
    tls: &ClientTls,
    name: ServerName<'static>,
    stream: IO,
) -> io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    TlsConnector::from(tls.current())
        .connect(name, stream)
        .await
}

/// How long a client may take over its handshake; a silent one is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once at most; accepting waits beyond it.
const MAX_HANDSHAKES: usize = 256;
/// Finished connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// Whether a handshake failed on the client's certificate (worth an
/// operator's notice: a misconfigured peer, not a port scanner).
fn refused_certificate(err: &io::Error) -> bool {
    matches!(
        err.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_))
    )
}

/// The connections of `accepted` after their TLS handshake with the config
/// current at accept time. Handshakes run side by side (a slow client
/// delays no other), each for [`HANDSHAKE_TIMEOUT`] at most; one that fails
/// closes its connection and is logged at debug (a port scanner is not
/// news). Accepting stops when the returned stream is dropped.
pub fn accept<IO>(
    accepted: impl Stream<Item = io::Result<IO>> + Send + 'static,
    tls: Arc<ServerTls>,
) -> ReceiverStream<io::Result<TlsStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let next = tokio::select! {
                () = sender.closed() => return,
                next = accepted.next() => next,
            };
            let stream = match next {
                None => return,
                Some(Ok(stream)) => stream,
                Some(Err(err)) => {
                    if sender.send(Err(err)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(tls.current());
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(err)) if refused_certificate(&err) => {
                        tracing::info!(%err, "TLS handshake refused: the client's certificate")
                    }
                    Ok(Err(err)) => tracing::debug!(%err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
