//! Blames the client for the requests tonic cannot decode. tonic answers a
//! message that is not valid protobuf (invalid UTF-8 in a `string` field
//! included) or that ends early with INTERNAL, and one over the size limit
//! with OUT_OF_RANGE; all are the sender's fault, so this layer turns them
//! into INVALID_ARGUMENT and RESOURCE_EXHAUSTED, saying which limit.
//!
//! It also refuses a request whose content-type is not gRPC's, which tonic
//! would otherwise decode as gRPC.
//!
//! It rewrites the status a server answers before any message (gRPC's
//! "trailers-only" response, in the headers), which is where a unary or
//! server-streaming call's undecodable request ends up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Code, Status};

/// A tower layer of [`ClientFault`]s; `limit` names the flag that sets the
/// server's message size limit, for the refusal to say.
#[derive(Debug, Clone, Copy)]
pub struct ClientFaultLayer {
    pub limit: &'static str,
}

impl<S> tower::Layer<S> for ClientFaultLayer {
    type Service = ClientFault<S>;

    fn layer(&self, inner: S) -> ClientFault<S> {
        ClientFault {
            inner,
            limit: self.limit,
        }
    }
}

/// A gRPC service whose decode failures are answered as the client's.
#[derive(Debug, Clone)]
pub struct ClientFault<S> {
    inner: S,
    limit: &'static str,
}

impl<S: NamedService> NamedService for ClientFault<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqB, B> tower::Service<http::Request<ReqB>> for ClientFault<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        if let Some(refusal) = wrong_content_type(request.headers()) {
            return Box::pin(async move { Ok(refusal) });
        }
        let answered = self.inner.call(request);
        let limit = self.limit;
        Box::pin(async move {
            let mut response = answered.await?;
            if let Some(blamed) =
                Status::from_header_map(response.headers()).and_then(|s| blame_client(&s, limit))
            {
                // Fails only for a message that cannot be a header value,
                // which ours, made of tonic's and ASCII, always can.
                let _ = blamed.add_header(response.headers_mut());
            }
            Ok(response)
        })
    }
}

/// A refusal of a request that does not say it is gRPC: tonic would decode
/// any body as gRPC; the protocol asks for HTTP 415 (Unsupported Media
/// Type), which this carries with a gRPC status a gRPC client can read.
fn wrong_content_type<B: Default>(headers: &http::HeaderMap) -> Option<http::Response<B>> {
    let content_type = headers.get(http::header::CONTENT_TYPE);
    if content_type.is_some_and(|value| value.as_bytes().starts_with(b"application/grpc")) {
        return None;
    }
    let mut refusal = Status::invalid_argument(format!(
        "content-type {content_type:?} is not application/grpc"
    ))
    .into_http::<B>();
    *refusal.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    Some(refusal)
}

/// The status a decode failure should have been, or `None` for any other
/// status (the service's own, which it already chose).
pub fn blame_client(status: &Status, limit: &str) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("message length too large") => {
            Some(Status::resource_exhausted(format!(
                "the message is larger than this server takes ({limit}): {message}"
            )))
        }
        Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message.starts_with("Unexpected EOF decoding stream")
                || message.starts_with("protocol error: received message with") =>
        {
            Some(Status::invalid_argument(format!(
                "the request is not a valid message: {message}"
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_failures_are_the_clients() {
        let utf8 = Status::internal(
            "failed to decode Protobuf message: GenerateRequest.stop: invalid string value: data is not UTF-8 encoded",
        );
        let blamed = blame_client(&utf8, "--max-request-bytes").unwrap();
        assert_eq!(blamed.code(), Code::InvalidArgument);
        assert!(blamed.message().contains("not UTF-8"), "{blamed}");

        let truncated = Status::internal("Unexpected EOF decoding stream.");
        assert_eq!(
            blame_client(&truncated, "x").unwrap().code(),
            Code::InvalidArgument
        );

        let large = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
        );
        let blamed = blame_client(&large, "--max-request-bytes").unwrap();
        assert_eq!(blamed.code(), Code::ResourceExhausted);
        assert!(blamed.message().contains("--max-request-bytes"), "{blamed}");
        assert!(
            blamed.message().contains("the limit is: 8 bytes"),
            "{blamed}"
        );
    }

    #[test]
    fn the_services_own_statuses_stay() {
        for status in [
            Status::internal("step failed"),
            Status::out_of_range("something else"),
            Status::invalid_argument("top_p"),
        ] {
            assert!(blame_client(&status, "x").is_none(), "{status}");
        }
    }

    #[tokio::test]
    async fn the_layer_rewrites_a_trailers_only_answer() {
        use tower::{Layer, ServiceExt};
        let inner = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(
                Status::internal("failed to decode Protobuf message: bad wire type")
                    .into_http::<String>(),
            )
        });
        let service = ClientFaultLayer { limit: "--x" }.layer(inner);
        let grpc = http::Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        let response = service.clone().oneshot(grpc).await.unwrap();
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("bad wire type"), "{status}");

        let text = http::Request::builder()
            .header("content-type", "text/plain")
            .body(())
            .unwrap();
        let response = service.oneshot(text).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let status = Status::from_header_map(response.headers()).unwrap();
        assert!(status.message().contains("text/plain"), "{status}");
    }
}
