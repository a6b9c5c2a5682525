//! A throwaway certificate authority for a local secure cluster (`moe up
//! --tls`) and the tests: a CA, the router's server certificate (for
//! 127.0.0.1 and localhost), the experts' server certificate, and the
//! client certificate the router presents to them. Never for production:
//! the CA's key is thrown away with the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use moe_proto::tls::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The names loopback certificates carry.
pub const LOOPBACK_NAMES: [&str; 3] = ["127.0.0.1", "localhost", "::1"];

/// A CA that signs certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A certificate and its key, as PEM text.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by
    /// this CA.
    pub fn issue(&self, names: &[&str], usage: Usage) -> anyhow::Result<Issued> {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "moe".into()),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes `NAME.pem` and `NAME-key.pem` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<Identity> {
        let identity = Identity {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        write_private(&identity.cert, &self.cert)?;
        write_private(&identity.key, &self.key)?;
        Ok(identity)
    }
}

/// Writes `text` to `path`, readable by its owner only (keys among them).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The files of a local secure cluster, in a temporary directory removed
/// when the last clone is dropped.
#[derive(Clone)]
pub struct LocalPki {
    dir: Arc<tempfile::TempDir>,
}

impl std::fmt::Debug for LocalPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPki")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl LocalPki {
    /// A new CA and its certificates: `ca.pem`, `router.pem` (server, for
    /// loopback), `router-client.pem` (the router's client certificate),
    /// `expert.pem` (server, for loopback; every expert shares it), each
    /// with its `-key.pem`.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("moe-tls-")
            .tempdir()
            .context("cannot make a directory for the certificates")?;
        let ca = Ca::new("moe-serve local CA")?;
        write_private(&dir.path().join("ca.pem"), &ca.cert_pem())?;
        ca.issue(&LOOPBACK_NAMES, Usage::Server)?
            .write(dir.path(), "router")?;
        ca.issue(&["router"], Usage::Client)?
            .write(dir.path(), "router-client")?;
        ca.issue(&LOOPBACK_NAMES, Usage::Server)?
            .write(dir.path(), "expert")?;
        Ok(Self { dir: Arc::new(dir) })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA every certificate here comes from: what clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    fn identity(&self, name: &str) -> Identity {
        Identity {
            cert: self.dir().join(format!("{name}.pem")),
            key: self.dir().join(format!("{name}-key.pem")),
        }
    }

    /// The router's server certificate (the public API).
    pub fn router(&self) -> Identity {
        self.identity("router")
    }

    /// The client certificate the router presents to experts.
    pub fn router_client(&self) -> Identity {
        self.identity("router-client")
    }

    /// The experts' server certificate.
    pub fn expert(&self) -> Identity {
        self.identity("expert")
    }

    /// expert-svc's TLS flags.
    pub fn expert_args(&self) -> Vec<String> {
        let expert = self.expert();
        vec![
            "--tls-cert".into(),
            path_arg(&expert.cert),
            "--tls-key".into(),
            path_arg(&expert.key),
            "--tls-ca".into(),
            path_arg(&self.ca()),
        ]
    }

    /// router-svc's TLS flags: its public certificate, the experts' CA and
    /// its client certificate.
    pub fn router_args(&self) -> Vec<String> {
        let (router, client) = (self.router(), self.router_client());
        vec![
            "--tls-cert".into(),
            path_arg(&router.cert),
            "--tls-key".into(),
            path_arg(&router.key),
            "--expert-tls-ca".into(),
            path_arg(&self.ca()),
            "--expert-tls-cert".into(),
            path_arg(&client.cert),
            "--expert-tls-key".into(),
            path_arg(&client.key),
        ]
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_load_as_tls_configs() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let pki = LocalPki::generate().unwrap();
        moe_proto::tls::server(moe_proto::tls::ServerTlsFiles {
            identity: pki.expert(),
            client_ca: Some(pki.ca()),
        })
        .unwrap();
        moe_proto::tls::client(moe_proto::tls::ClientTlsFiles {
            ca: pki.ca(),
            identity: Some(pki.router_client()),
        })
        .unwrap();
    }
}
