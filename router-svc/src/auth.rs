//! Bearer tokens on the public API (`--api-keys-file`): a call must carry
//! `authorization: Bearer KEY` with one of the file's keys, or it gets
//! UNAUTHENTICATED before any handler runs.
//!
//! The keys are kept only as SHA-256 digests, and a presented token is
//! compared with every one of them in constant time, without stopping at a
//! match: how long a check takes says nothing of how close a guess came,
//! nor of which key matched. Digests also make every comparison the same
//! length, so a key's length does not leak either. The token is taken out of
//! the request's metadata once checked, so no handler, log line or trace
//! can see it; messages never repeat it.

use std::path::PathBuf;
use std::sync::Arc;

use moe_proto::reload::{ReadError, Reloading};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The keys of an API keys file.
#[derive(Debug)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// One key a line; blank lines and `#` comments are ignored. A file
    /// with no key is refused: it would lock every client out (and a
    /// rotation caught half-written must not).
    pub fn parse(text: &[u8], path: &std::path::Path) -> Result<Self, String> {
        let text =
            std::str::from_utf8(text).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
        let digests: Vec<[u8; 32]> = moe_proto::api_keys::keys(text)
            .map(|key| digest(key.as_bytes()))
            .collect();
        if digests.is_empty() {
            return Err(format!(
                "{}: no API key in it (one a line; blank lines and # comments are ignored)",
                path.display()
            ));
        }
        Ok(Self { digests })
    }

    /// Whether `token` is one of the keys, in time that depends only on
    /// the number of keys.
    pub fn accepts(&self, token: &[u8]) -> bool {
        let presented = digest(token);
        let found = self
            .digests
            .iter()
            .fold(Choice::from(0), |found, key| found | key.ct_eq(&presented));
        found.into()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Reads `path` and watches it: a changed file takes effect within a
/// second or two, for new calls.
pub fn watch_keys(path: PathBuf) -> Result<Arc<Reloading<ApiKeys>>, KeysError> {
    let shown = path.clone();
    Reloading::start("API keys", vec![path], move |contents| {
        ApiKeys::parse(&contents[0], &shown).map_err(KeysError)
    })
}

/// An API keys file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--api-keys-file: {0}")]
pub struct KeysError(String);

impl From<ReadError> for KeysError {
    fn from(err: ReadError) -> Self {
        Self(err.to_string())
    }
}

/// The check, as a tonic interceptor; open (every call passes) without
/// keys.
#[derive(Clone, Default)]
pub struct Authenticator {
    keys: Option<Arc<Reloading<ApiKeys>>>,
}

impl Authenticator {
    pub fn new(keys: Option<Arc<Reloading<ApiKeys>>>) -> Self {
        Self { keys }
    }

    /// Passes every call (health and reflection without `--auth-health`).
    pub fn open() -> Self {
        Self::default()
    }

    fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "this router requires an API key: send `authorization: Bearer KEY` metadata",
            ));
        };
        let bytes = value.as_bytes();
        let token = match bytes.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
            _ => {
                return Err(Status::unauthenticated(
                    "the authorization metadata must be `Bearer KEY`",
                ));
            }
        };
        if keys.current().accepts(token) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the API key is not valid"))
        }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let checked = self.check(request.metadata());
        // Whatever the outcome, nothing after this sees the token.
        request.metadata_mut().remove("authorization");
        checked.map(|()| request)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn keys(text: &str) -> Result<ApiKeys, String> {
        ApiKeys::parse(text.as_bytes(), Path::new("keys"))
    }

    fn call(auth: &mut Authenticator, header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
        }
        let passed = auth.call(request)?;
        assert!(
            passed.metadata().get("authorization").is_none(),
            "the token is removed"
        );
        Ok(())
    }

    #[test]
    fn lines_comments_and_blank_lines() {
        let parsed = keys("# clients\n\nalpha\n  beta  \n#gamma\n").unwrap();
        assert!(parsed.accepts(b"alpha"));
        assert!(parsed.accepts(b"beta"));
        assert!(!parsed.accepts(b"gamma"));
        assert!(!parsed.accepts(b"#gamma"));
        assert!(!parsed.accepts(b""));
        assert!(!parsed.accepts(b"alph"));
        let err = keys("# nothing\n\n").unwrap_err();
        assert!(err.contains("no API key"), "{err}");
    }

    #[test]
    fn missing_wrong_and_right_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "s3cret-key\n").unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let mut auth = Authenticator::new(Some(watch_keys(path).unwrap()));
        let missing = call(&mut auth, None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = call(&mut auth, Some("Bearer guess-key")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("guess"), "{}", wrong.message());
        let scheme = call(&mut auth, Some("Basic s3cret-key")).unwrap_err();
        assert!(!scheme.message().contains("s3cret"), "{}", scheme.message());
        call(&mut auth, Some("Bearer s3cret-key")).unwrap();
        call(&mut auth, Some("bearer s3cret-key")).unwrap();
        call(&mut Authenticator::open(), None).unwrap();
    }
}
