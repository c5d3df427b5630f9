//! Connections of the client listener, and the client address each one
//! stands for.
//!
//! Behind a TCP load balancer every connection comes from the balancer's
//! address, so rate limits and pending-login quotas would lump all clients
//! together. With `--proxy-protocol` the node expects the PROXY protocol
//! (version 2, binary) header that balancers such as HAProxy, Envoy, NGINX
//! and the cloud network load balancers put before the connection's first
//! byte, and takes the client's address from it. A connection without a
//! valid header is dropped: only turn it on where every connection comes
//! through such a balancer, or anyone could name any address.
//!
//! Each header is read on a task of its own under [`HEADER_DEADLINE`], so a
//! connection that never sends one holds up nobody else's accept.
//!
//! The peer listener's connections come through here too, without PROXY
//! headers but with a bound on how many one address may hold open at once
//! ([`MAX_PEER_CONNECTIONS`]): a holder of a fleet certificate cannot open
//! connections until the node runs out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a new connection has to send its PROXY header.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// The fixed part of a version 2 header: signature, version and command,
/// family and protocol, length of the rest.
const FIXED_LEN: usize = 16;

/// Largest address block (and TLVs) accepted after the fixed part. Two
/// IPv6 addresses and ports take 36 bytes; balancers add a few TLVs.
const MAX_REST_LEN: usize = 512;

/// Connections one address may hold open to the peer listener. A node
/// keeps one to each peer (Raft and forwarded requests share it), the
/// operator's tools a few.
pub const MAX_PEER_CONNECTIONS: usize = 64;

/// Open connections per remote address, for a listener with a bound.
#[derive(Debug, Default)]
struct Open(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl Open {
    /// Takes a slot for `ip`, if it has one left under `cap`.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, cap: usize) -> Option<Slot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot(Arc::clone(self), ip))
    }
}

/// One connection's place under its address's bound, given back on drop.
#[derive(Debug)]
struct Slot(Arc<Open>, std::net::IpAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// A client connection, and the address it is taken to come from.
#[derive(Debug)]
pub struct ClientConn {
    stream: TcpStream,
    info: TcpConnectInfo,
    _slot: Option<Slot>,
}

impl Connected for ClientConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ClientConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reads exactly one PROXY v2 header off `stream` (nothing past it) and
/// returns the client address it names; `None` for a LOCAL header (the
/// balancer's own health check) or an address family without one.
async fn read_header(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut head = vec![0u8; FIXED_LEN];
    stream.read_exact(&mut head).await?;
    if &head[..PROTOCOL_PREFIX.len()] != PROTOCOL_PREFIX {
        return Err(invalid("not a PROXY protocol version 2 header"));
    }
    let rest = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if rest > MAX_REST_LEN {
        return Err(invalid("PROXY header too long"));
    }
    head.resize(FIXED_LEN + rest, 0);
    stream.read_exact(&mut head[FIXED_LEN..]).await?;
    let header = Header::try_from(&head[..]).map_err(|e| invalid(&e.to_string()))?;
    Ok(match (header.command, header.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    })
}

/// Takes one accepted connection to the server: with `proxy_protocol`, once
/// its header is read (and dropped without one, or after the deadline).
async fn admit(
    mut stream: TcpStream,
    (peer, slot): (SocketAddr, Option<Slot>),
    proxy_protocol: bool,
    to_server: mpsc::Sender<io::Result<ClientConn>>,
) {
    // Small request/answer messages: Nagle's algorithm would hold each
    // answer back until the peer's delayed ACK (~40 ms on Linux).
    let _ = stream.set_nodelay(true);
    let client = if proxy_protocol {
        match tokio::time::timeout(HEADER_DEADLINE, read_header(&mut stream)).await {
            Ok(Ok(named)) => named.unwrap_or(peer),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "dropped a connection without a valid PROXY header");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "dropped a connection that sent no PROXY header in time");
                return;
            }
        }
    } else {
        peer
    };
    let info = TcpConnectInfo {
        local_addr: stream.local_addr().ok(),
        remote_addr: Some(client),
    };
    let _ = to_server
        .send(Ok(ClientConn {
            stream,
            info,
            _slot: slot,
        }))
        .await;
}

/// The connections of the client listener, for `serve_with_incoming`.
/// Accepting stops when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    proxy_protocol: bool,
) -> ReceiverStream<io::Result<ClientConn>> {
    accept(listener, proxy_protocol, None)
}

/// The connections of the peer listener: at most [`MAX_PEER_CONNECTIONS`]
/// open at once from one address; past it a new one is closed at once.
pub fn peer_incoming(listener: TcpListener) -> ReceiverStream<io::Result<ClientConn>> {
    accept(listener, false, Some(MAX_PEER_CONNECTIONS))
}

fn accept(
    listener: TcpListener,
    proxy_protocol: bool,
    cap: Option<usize>,
) -> ReceiverStream<io::Result<ClientConn>> {
    let (tx, rx) = mpsc::channel(64);
    let open = Arc::new(Open::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let slot = match cap {
                        None => None,
                        Some(cap) => match open.take(peer.ip(), cap) {
                            Some(slot) => Some(slot),
                            None => {
                                tracing::warn!(%peer, cap, "too many connections from one address: closed");
                                drop(stream);
                                continue;
                            }
                        },
                    };
                    tokio::spawn(admit(stream, (peer, slot), proxy_protocol, tx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Protocol, Version};
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), server.expect("accept").0)
    }

    fn header(addresses: Addresses) -> Vec<u8> {
        Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
            .build()
            .expect("header")
    }

    #[tokio::test]
    async fn the_header_names_the_client_and_nothing_after_it_is_consumed() {
        let (mut client, mut server) = pair().await;
        let from: SocketAddr = "[2001:db8::7]:4242".parse().expect("addr");
        let to: SocketAddr = "[2001:db8::1]:443".parse().expect("addr");
        let mut bytes = header((from, to).into());
        bytes.extend_from_slice(b"PRI * HTTP/2.0");
        client.write_all(&bytes).await.expect("write");
        assert_eq!(read_header(&mut server).await.expect("header"), Some(from));
        let mut next = [0u8; 3];
        server.read_exact(&mut next).await.expect("read");
        assert_eq!(&next, b"PRI");
    }

    #[tokio::test]
    async fn a_connection_without_a_valid_header_is_refused() {
        for bytes in [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n".to_vec(),
        ] {
            let (mut client, mut server) = pair().await;
            client.write_all(&bytes).await.expect("write");
            read_header(&mut server)
                .await
                .expect_err("not a version 2 header");
        }
    }
}
