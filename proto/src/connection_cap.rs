//! A cap on the connections one listener holds at once (`--max-connections`).
//!
//! HTTP/2 settings bound the streams of one connection; nothing in tonic
//! bounds the connections, and each holds a file descriptor, HTTP/2 state
//! and up to its windows of buffered data. At the cap the server stops
//! accepting: the next connections wait in the kernel's backlog (and, if
//! it fills, are refused there) until one closes, while those it holds are
//! served as before.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

/// The connections of `accepted`, at most `limit` of them open at once:
/// the next is taken from `accepted` only once fewer are open. Accepting
/// stops when the returned stream is dropped.
pub fn capped<IO, E>(
    accepted: impl Stream<Item = Result<IO, E>> + Send + 'static,
    limit: usize,
) -> ReceiverStream<Result<Held<IO>, E>>
where
    IO: Send + 'static,
    E: Send + 'static,
{
    let (sender, receiver) = mpsc::channel(1);
    let open = Arc::new(Semaphore::new(limit));
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        // Warned once each time the cap is reached, not per connection.
        let mut warned = false;
        loop {
            let at_cap = open.available_permits() == 0;
            if at_cap && !warned {
                tracing::warn!(
                    limit,
                    "--max-connections reached: new connections wait until one closes"
                );
            }
            warned = at_cap;
            let permit = tokio::select! {
                () = sender.closed() => return,
                permit = open.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let next = tokio::select! {
                () = sender.closed() => return,
                next = accepted.next() => next,
            };
            let Some(next) = next else { return };
            let held = next.map(|io| Held { io, _open: permit });
            if sender.send(held).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// A connection that counts against the cap until it is dropped.
pub struct Held<IO> {
    io: IO,
    _open: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Held<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Held<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Held<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Connections are stand-ins here: what matters is when the next one
    /// is taken from the listener.
    #[tokio::test]
    async fn the_next_connection_is_taken_only_once_one_closes() {
        let (incoming, listener) = mpsc::channel::<Result<u32, ()>>(8);
        for connection in 0..4 {
            incoming.send(Ok(connection)).await.unwrap();
        }
        let mut capped = capped(ReceiverStream::new(listener), 2);
        let first = capped.next().await.unwrap().unwrap();
        let second = capped.next().await.unwrap().unwrap();
        assert_eq!((first.io, second.io), (0, 1));
        let waiting = tokio::time::timeout(Duration::from_millis(100), capped.next()).await;
        assert!(waiting.is_err(), "a third connection while two are open");

        drop(first);
        let third = capped.next().await.unwrap().unwrap();
        assert_eq!(third.io, 2);
        drop((second, third));
        assert_eq!(capped.next().await.unwrap().unwrap().io, 3);
    }

    #[tokio::test]
    async fn accept_errors_pass_through_and_hold_nothing() {
        let (incoming, listener) = mpsc::channel::<Result<u32, &str>>(8);
        incoming.send(Err("EMFILE")).await.unwrap();
        incoming.send(Ok(7)).await.unwrap();
        let mut capped = capped(ReceiverStream::new(listener), 1);
        assert_eq!(capped.next().await.unwrap().err(), Some("EMFILE"));
        assert_eq!(capped.next().await.unwrap().unwrap().io, 7);
    }
}
