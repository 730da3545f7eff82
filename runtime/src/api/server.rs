//! Accept loops for the API listeners: one task per connection, peer credentials captured at
//! accept, a deadline for request headers, and a graceful drain bounded by the caller's
//! timeout.
//!
//! Connections are admitted by [`ConnectionLimits`], decided at accept and answered at once:
//! no client (a uid on the socket, an address on TCP) holds more than its share, and part of
//! every listener is kept for operators, so a local user who opens thousands of idle
//! connections cannot lock root out. A refused connection gets a one-line 503 and is closed;
//! nothing is read from it.
//!
//! Each connection is placed by its first bytes: one that asks for `/healthz` is served on the
//! front thread that accepts, any other on the main runtime (see [`super::front`]).
//!
//! We run our own loop over hyper rather than `axum::serve` because a privileged daemon needs
//! what that helper does not offer: these limits, the header deadline, and the peer's
//! credentials and groups read from the socket itself when it is accepted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tower::ServiceExt as _;

use super::PeerCred;

/// Who a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Uid(u32),
    Address(IpAddr),
}

impl ClientKey {
    /// The client a TCP peer address stands for. One host can take many addresses for free:
    /// every loopback address (all of 127.0.0.0/8, and ::1) is this host, an IPv4 address
    /// mapped into IPv6 is that IPv4 address, and an IPv6 peer is its /64, the block one
    /// host is normally given.
    pub fn of_address(ip: IpAddr) -> Self {
        use std::net::{Ipv4Addr, Ipv6Addr};
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let key = match ip {
            ip if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        };
        ClientKey::Address(key)
    }
}

/// How many connections a listener serves at once, and how they are shared.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections at once on the listener.
    pub total: usize,
    /// Connections one client may hold (operators are not limited by this).
    pub per_client: usize,
    /// Of `total`, how many only operators may use.
    pub reserved_for_operators: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: 1024,
            per_client: 64,
            reserved_for_operators: 32,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client already holds `per_client` connections.
    PerClient,
    /// Every connection not kept for operators is taken.
    Full,
}

/// Open connections per client on one listener. Pure bookkeeping, unit-tested.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    total: usize,
    by_client: HashMap<ClientKey, usize>,
}

impl ConnectionTable {
    /// Counts a new connection in, or says why not.
    pub fn admit(
        &mut self,
        limits: &ConnectionLimits,
        client: ClientKey,
        operator: bool,
    ) -> Result<(), Refusal> {
        let mine = self.by_client.get(&client).copied().unwrap_or(0);
        if operator {
            if self.total >= limits.total {
                return Err(Refusal::Full);
            }
        } else {
            if mine >= limits.per_client {
                return Err(Refusal::PerClient);
            }
            if self.total >= limits.total.saturating_sub(limits.reserved_for_operators) {
                return Err(Refusal::Full);
            }
        }
        self.total += 1;
        *self.by_client.entry(client).or_insert(0) += 1;
        Ok(())
    }

    /// Counts a connection out.
    pub fn release(&mut self, client: ClientKey) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.by_client.remove(&client);
            }
        }
    }

    pub fn open(&self) -> usize {
        self.total
    }
}

/// Releases a connection's place when its task ends, however it ends.
struct Admitted {
    table: Arc<Mutex<ConnectionTable>>,
    client: ClientKey,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .release(self.client);
    }
}

/// What a refused client reads before the connection closes.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 120\r\n\r\n{\"error\":{\"code\":\"too_many_connections\",\"message\":\"too many open connections from this client or in total; close some\"}}";

/// The address of a TCP peer, for logs.
#[derive(Debug, Clone, Copy)]
pub struct TcpPeer(pub SocketAddr);

/// Something that accepts connections and says who is on the other end.
pub trait Acceptor: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static;
    type Peer: Clone + Send + Sync + 'static;
    /// Who the peer counts as for connection limits.
    fn client(peer: &Self::Peer) -> ClientKey;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send;
    /// Copies the first bytes a connection sent into `buf`, leaving them to be read.
    fn peek(
        io: &Self::Io,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send;
    /// A connection as a plain socket, to register with another runtime, and back.
    type PlainIo: Send + 'static;
    fn io_into_std(io: Self::Io) -> std::io::Result<Self::PlainIo>;
    fn io_from_std(plain: Self::PlainIo) -> std::io::Result<Self::Io>;
    /// The listener as a plain socket, to register with another runtime.
    type Plain: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Plain>;
    /// Registers a plain socket with the current runtime.
    fn from_std(plain: Self::Plain) -> std::io::Result<Self>
    where
        Self: Sized;
}

impl Acceptor for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = PeerCred;

    fn client(peer: &PeerCred) -> ClientKey {
        ClientKey::Uid(peer.uid)
    }

    async fn accept(&mut self) -> std::io::Result<(Self::Io, PeerCred)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let peer = PeerCred::of(&stream);
        Ok((stream, peer))
    }

    async fn peek(io: &Self::Io, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        loop {
            io.readable().await?;
            let peeked = io.try_io(tokio::io::Interest::READABLE, || {
                nix::sys::socket::recv(io.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                    .map_err(std::io::Error::from)
            });
            match peeked {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    type PlainIo = std::os::unix::net::UnixStream;

    fn io_into_std(io: Self::Io) -> std::io::Result<Self::PlainIo> {
        io.into_std()
    }

    fn io_from_std(plain: Self::PlainIo) -> std::io::Result<Self::Io> {
        tokio::net::UnixStream::from_std(plain)
    }

    type Plain = std::os::unix::net::UnixListener;

    fn into_std(self) -> std::io::Result<Self::Plain> {
        tokio::net::UnixListener::into_std(self)
    }

    fn from_std(plain: Self::Plain) -> std::io::Result<Self> {
        tokio::net::UnixListener::from_std(plain)
    }
}

impl Acceptor for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Peer = TcpPeer;

    fn client(peer: &TcpPeer) -> ClientKey {
        ClientKey::of_address(peer.0.ip())
    }

    async fn accept(&mut self) -> std::io::Result<(Self::Io, TcpPeer)> {
        let (stream, address) = tokio::net::TcpListener::accept(self).await?;
        Ok((stream, TcpPeer(address)))
    }

    async fn peek(io: &Self::Io, buf: &mut [u8]) -> std::io::Result<usize> {
        io.peek(buf).await
    }

    type PlainIo = std::net::TcpStream;

    fn io_into_std(io: Self::Io) -> std::io::Result<Self::PlainIo> {
        io.into_std()
    }

    fn io_from_std(plain: Self::PlainIo) -> std::io::Result<Self::Io> {
        tokio::net::TcpStream::from_std(plain)
    }

    type Plain = std::net::TcpListener;

    fn into_std(self) -> std::io::Result<Self::Plain> {
        tokio::net::TcpListener::into_std(self)
    }

    fn from_std(plain: Self::Plain) -> std::io::Result<Self> {
        tokio::net::TcpListener::from_std(plain)
    }
}

/// Decides whether a peer is an operator, for the connections kept for them.
pub type IsOperator<P> = Arc<dyn Fn(&P) -> bool + Send + Sync>;

/// Serves `router` on `listener` until `stop` turns true, then lets open connections finish
/// their current request for at most `drain`. Returns whether every connection drained.
/// Connections that ask for `/healthz` are served on the current runtime (the front thread),
/// every other on `main` (see [`super::front`]).
pub async fn serve<A: Acceptor>(
    mut listener: A,
    router: Router,
    main: tokio::runtime::Handle,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    limits: ConnectionLimits,
    is_operator: IsOperator<A::Peer>,
) -> bool {
    let graceful = GracefulShutdown::new();
    let table = Arc::new(Mutex::new(ConnectionTable::default()));
    loop {
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
        let client = A::client(&peer);
        // Counted as a tenant's first: only a connection that would be refused asks whether
        // its peer is an operator (which may consult the user database).
        let as_tenant = table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(&limits, client, false);
        let admitted = match as_tenant {
            Ok(()) => Ok(()),
            Err(why) if is_operator(&peer) => table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .admit(&limits, client, true)
                .map_err(|_| why),
            Err(why) => Err(why),
        };
        if let Err(why) = admitted {
            tracing::debug!(?client, ?why, "connection refused");
            // Answer without waiting on the client: a full socket buffer just loses the text.
            tokio::spawn(async move {
                let mut io = io;
                let _ = tokio::time::timeout(
                    Duration::from_millis(100),
                    tokio::io::AsyncWriteExt::write_all(&mut io, REFUSED),
                )
                .await;
            });
            continue;
        }
        let place = Admitted {
            table: Arc::clone(&table),
            client,
        };
        let (router, main, watcher) = (router.clone(), main.clone(), graceful.watcher());
        let header_timeout = limits.header_timeout;
        let mut stopping = stop.clone();
        tokio::spawn(async move {
            let first_bytes = tokio::time::timeout(header_timeout, asks_for_health::<A>(&io));
            // A connection that has sent nothing when the listener stops is closed then, as
            // hyper closes an idle one, instead of holding the drain up.
            let placed = tokio::select! {
                placed = first_bytes => placed,
                _ = stopping.wait_for(|s| *s) => {
                    drop(place);
                    return;
                }
            };
            match placed {
                // Served here, on the front thread, for its promptness (see `super::front`).
                Ok(Ok(true)) => {
                    http_connection(io, peer, router, Some(main), header_timeout, watcher).await;
                }
                // Moved to the main runtime, where its handlers run, with no hop per request.
                Ok(Ok(false)) => match A::io_into_std(io) {
                    Ok(plain) => {
                        let served = main.spawn(async move {
                            match A::io_from_std(plain) {
                                Ok(io) => {
                                    http_connection(
                                        io,
                                        peer,
                                        router,
                                        None,
                                        header_timeout,
                                        watcher,
                                    )
                                    .await;
                                }
                                Err(e) => tracing::debug!(error = %e, "cannot move a connection"),
                            }
                        });
                        let _abort = super::front::AbortOnDrop(served.abort_handle());
                        let _ = served.await;
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot move a connection"),
                },
                Ok(Err(e)) => tracing::debug!(error = %e, "connection failed before its request"),
                // Nothing within the header deadline: closed, as hyper would.
                Err(_) => tracing::debug!("no request within the header deadline"),
            }
            drop(place);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(drain) => false,
    }
}

/// Whether a connection's first bytes, as they arrive, ask for `/healthz`. Clients send a
/// request line in one piece; one that trickles in is simply served as any other.
async fn asks_for_health<A: Acceptor>(io: &A::Io) -> std::io::Result<bool> {
    const HEALTH: &[u8] = b"GET /healthz";
    let mut head = [0u8; HEALTH.len() + 1];
    let n = A::peek(io, &mut head).await?;
    Ok(n == head.len() && head.starts_with(HEALTH) && matches!(head[HEALTH.len()], b' ' | b'?'))
}

/// Speaks HTTP/1.1 on one connection until it closes or the listener drains. With `hop`, the
/// connection is on the front thread and only `/healthz` is answered in place; otherwise every
/// request is handled on the current runtime.
async fn http_connection<Io, P>(
    io: Io,
    peer: P,
    router: Router,
    hop: Option<tokio::runtime::Handle>,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(peer.clone());
        let (router, hop) = (router.clone(), hop.clone());
        async move {
            match hop {
                Some(main) => super::front::dispatch(&main, router, request).await,
                None => router.oneshot(request).await,
            }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_placed_by_whether_its_first_bytes_ask_for_health() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for (sent, health) in [
            (&b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..], true),
            (b"GET /healthz?verbose HTTP/1.1\r\n\r\n", true),
            (b"GET /healthzz HTTP/1.1\r\n\r\n", false),
            (b"GET /v1/models HTTP/1.1\r\n\r\n", false),
            (b"POST /healthz HTTP/1.1\r\n\r\n", false),
            (b"GET /heal", false),
        ] {
            let (mut client, mut server) = tokio::net::UnixStream::pair().unwrap();
            client.write_all(sent).await.unwrap();
            let placed = asks_for_health::<tokio::net::UnixListener>(&server)
                .await
                .unwrap();
            assert_eq!(placed, health, "{}", String::from_utf8_lossy(sent));
            // Looking took nothing away: HTTP reads the request whole.
            let mut read = vec![0u8; sent.len()];
            server.read_exact(&mut read).await.unwrap();
            assert_eq!(read, sent);
        }
    }

    #[test]
    fn the_refusal_is_well_formed_http_with_json() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }

    #[test]
    fn clients_get_their_share_and_operators_keep_their_reserve() {
        let limits = ConnectionLimits {
            total: 10,
            per_client: 4,
            reserved_for_operators: 2,
            header_timeout: Duration::from_secs(1),
        };
        let mut t = ConnectionTable::default();
        let (a, b, root) = (
            ClientKey::Uid(1000),
            ClientKey::Uid(1001),
            ClientKey::Uid(0),
        );
        for _ in 0..4 {
            t.admit(&limits, a, false).unwrap();
        }
        assert_eq!(t.admit(&limits, a, false), Err(Refusal::PerClient));
        for _ in 0..4 {
            t.admit(&limits, b, false).unwrap();
        }
        // 8 of 10 used: the last 2 are the operators'.
        let c = ClientKey::Address("127.0.0.1".parse().unwrap());
        assert_eq!(t.admit(&limits, c, false), Err(Refusal::Full));
        t.admit(&limits, root, true).unwrap();
        t.admit(&limits, root, true).unwrap();
        assert_eq!(t.admit(&limits, root, true), Err(Refusal::Full));
        t.release(a);
        assert_eq!(
            t.admit(&limits, c, false),
            Err(Refusal::Full),
            "still 9 of 10"
        );
        t.release(root);
        t.release(root);
        t.admit(&limits, c, false).unwrap();
        assert_eq!(t.open(), 8);
    }

    #[test]
    fn one_host_is_one_client_however_many_addresses_it_takes() {
        let key = |a: &str| ClientKey::of_address(a.parse().unwrap());
        // Every loopback address is this host.
        assert_eq!(key("127.0.0.1"), key("127.1.2.3"));
        assert_eq!(key("127.0.0.1"), key("::1"));
        assert_eq!(key("127.0.0.1"), key("::ffff:127.9.9.9"));
        // An IPv4 peer mapped into IPv6 is that peer.
        assert_eq!(key("192.0.2.7"), key("::ffff:192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        // An IPv6 peer is its /64.
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
