//! Accept loops for the API listeners: one task per connection, at most `MAX_CONNECTIONS` at a
//! time, a deadline for reading request headers, peer credentials captured at accept, and a
//! graceful drain bounded by the caller's timeout.
//!
//! We run our own loop over hyper rather than `axum::serve` because a privileged daemon needs
//! what that helper does not offer: a connection cap and header deadline (so a slow or idle
//! client cannot exhaust file descriptors, including the operators' socket), and the peer's
//! credentials and groups read from the socket itself when it is accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt as _;

use super::PeerCred;

/// Connections served at once per listener; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The address of a TCP peer, for logs.
#[derive(Debug, Clone, Copy)]
pub struct TcpPeer(pub SocketAddr);

/// Something that accepts connections and says who is on the other end.
pub trait Acceptor: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Peer: Clone + Send + Sync + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send;
}

impl Acceptor for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = PeerCred;

    async fn accept(&mut self) -> std::io::Result<(Self::Io, PeerCred)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let peer = PeerCred::of(&stream);
        Ok((stream, peer))
    }
}

impl Acceptor for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Peer = TcpPeer;

    async fn accept(&mut self) -> std::io::Result<(Self::Io, TcpPeer)> {
        let (stream, address) = tokio::net::TcpListener::accept(self).await?;
        Ok((stream, TcpPeer(address)))
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections finish
/// their current request for at most `drain`. Returns whether every connection drained.
pub async fn serve<A: Acceptor>(
    mut listener: A,
    router: Router,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> bool {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (io, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(peer.clone());
            router.clone().oneshot(request)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(drain) => false,
    }
}
