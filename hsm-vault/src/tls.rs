//! TLS for a node's two listeners and for its connections to peers (rustls
//! through tonic, ring provider).
//!
//! - The **client listener** (`--listen`) serves the client API with the
//!   node's server certificate; clients check it against the fleet CA.
//! - The **peer listener** (`--peer-listen`) serves the node-to-node API, the
//!   operator API and client requests forwarded by other nodes, over mutual
//!   TLS: the handshake fails unless the caller presents a client
//!   certificate issued by the fleet CA. Each API then checks whom the
//!   certificate names ([`PeerCheck`]): a Raft message must come from the
//!   certificate of the node it says sent it (`node-<id>`), an operator
//!   request from the operator's (`operator`).
//!
//! Certificates name their holder in a DNS subjectAltName (and the common
//! name): `node-<id>` for a node, `operator` for the operator. A node checks
//! a peer's *server* certificate for `node-<id>` too, so a node cannot pose
//! as another one even on an address they share. Nothing here logs or
//! returns key material.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use zeroize::Zeroizing;

use crate::replication::NodeId;

/// The name the operator's client certificate carries.
pub const OPERATOR_NAME: &str = "operator";

/// The name node `id`'s certificates carry.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}")
}

/// A TLS file that could not be used. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsFileError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsFileError::Read {
            path: path.to_owned(),
            source,
        })
}

/// Reads a PEM certificate (chain) file.
pub fn load_certificate(path: &Path) -> Result<Certificate, TlsFileError> {
    let pem = read(path)?;
    if !contains(&pem, b"-----BEGIN CERTIFICATE-----") {
        return Err(TlsFileError::NoCertificate(path.to_owned()));
    }
    Ok(Certificate::from_pem(pem.as_slice()))
}

/// Reads a PEM certificate and its PEM private key.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsFileError> {
    let cert_pem = read(cert)?;
    if !contains(&cert_pem, b"-----BEGIN CERTIFICATE-----") {
        return Err(TlsFileError::NoCertificate(cert.to_owned()));
    }
    let key_pem = read(key)?;
    if !contains(&key_pem, b"PRIVATE KEY-----") {
        return Err(TlsFileError::NoKey(key.to_owned()));
    }
    Ok(Identity::from_pem(cert_pem.as_slice(), key_pem.as_slice()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A node's TLS material: its server certificate, and for a member of a
/// replica group the fleet CA and its client certificate.
#[derive(Clone)]
pub struct NodeTls {
    server: Identity,
    peers: Option<(Certificate, Identity)>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("peers", &self.peers.is_some())
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// The server certificate alone (a node without peers).
    pub fn server(identity: Identity) -> Self {
        NodeTls {
            server: identity,
            peers: None,
        }
    }

    /// Adds the fleet CA and this node's client certificate (a member of a
    /// replica group).
    pub fn with_peers(self, ca: Certificate, client: Identity) -> Self {
        NodeTls {
            peers: Some((ca, client)),
            ..self
        }
    }

    /// The client listener: server certificate, no client certificates.
    pub fn client_listener(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.server.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The peer listener: server certificate, and a client certificate of
    /// the fleet CA required in the handshake. `None` without a fleet CA.
    pub fn peer_listener(&self) -> Option<ServerTlsConfig> {
        let (ca, _) = self.peers.as_ref()?;
        Some(
            ServerTlsConfig::new()
                .identity(self.server.clone())
                .client_ca_root(ca.clone())
                .client_auth_optional(false)
                .timeout(HANDSHAKE_TIMEOUT),
        )
    }

    /// How this node connects to its peers. `None` without a fleet CA.
    pub fn peer_connector(&self) -> Option<PeerConnector> {
        let (ca, identity) = self.peers.clone()?;
        Some(PeerConnector::Tls { ca, identity })
    }
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node connects to the peer listeners of other nodes (Raft messages
/// and forwarded client requests).
#[derive(Clone, Default)]
pub enum PeerConnector {
    /// Mutual TLS: this node's client certificate; the peer's server
    /// certificate must chain to the fleet CA and name `node-<id>`.
    Tls { ca: Certificate, identity: Identity },
    /// Plaintext (a node started with `--plaintext`: development only).
    #[default]
    Plaintext,
}

impl std::fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerConnector::Tls { .. } => "PeerConnector::Tls",
            PeerConnector::Plaintext => "PeerConnector::Plaintext",
        })
    }
}

impl PeerConnector {
    /// The endpoint of node `id`'s peer listener at `addr` (HOST:PORT).
    pub fn endpoint(&self, id: NodeId, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        match self {
            PeerConnector::Plaintext => Endpoint::from_shared(format!("http://{addr}")),
            PeerConnector::Tls { ca, identity } => {
                Endpoint::from_shared(format!("https://{addr}"))?.tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(ca.clone())
                        .identity(identity.clone())
                        .domain_name(node_name(id))
                        .timeout(HANDSHAKE_TIMEOUT),
                )
            }
        }
    }
}

/// Whether the APIs of the peer listener check the caller's certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerCheck {
    /// Mutual TLS: the caller's certificate must name the expected holder.
    Certificates,
    /// Plaintext (development only): there is no certificate to check.
    #[default]
    Off,
}

impl PeerCheck {
    /// Refuses `request` unless its TLS client certificate names `name`:
    /// UNAUTHENTICATED without a certificate, PERMISSION_DENIED for a
    /// certificate of someone else. (The handshake already checked that the
    /// certificate chains to the fleet CA.)
    pub fn require<T>(self, request: &Request<T>, name: &str) -> Result<(), Status> {
        if self == PeerCheck::Off {
            return Ok(());
        }
        let certs = request
            .peer_certs()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("this API needs a client certificate of the fleet CA")
            })?;
        if names(&certs[0], name) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "the client certificate does not name {name:?}, the only caller allowed here"
            )))
        }
    }
}

/// Whether the certificate `der` names `name` (a DNS subjectAltName).
pub fn names(der: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(der)
        .and_then(|cert| cert.verify_is_valid_for_subject_name(&server_name))
        .is_ok()
}

/// Who may call a service on the peer listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The operator API: the operator's certificate only.
    Operator,
    /// The node-to-node API and forwarded client requests: a node's
    /// certificate (which node, the service checks against the message).
    Node,
}

/// Whether `der` names some node (`node-<id>`).
fn names_a_node(der: &CertificateDer<'_>) -> bool {
    webpki::EndEntityCert::try_from(der).is_ok_and(|cert| {
        cert.valid_dns_names().any(|name| {
            name.strip_prefix("node-")
                .is_some_and(|id| id.parse::<NodeId>().is_ok())
        })
    })
}

/// A service of the peer listener behind its gate: the call is refused by
/// the caller's TLS client certificate, read from the request's head,
/// **before** the body is read or decoded, so a holder of some other
/// certificate of the fleet CA cannot make the node buffer a large message
/// (the operator API takes bulk handovers). The gate wraps the service
/// itself, not a route, so no spelling of a path gets around it. The
/// service then checks the exact holder again (the node a Raft message says
/// sent it; the operator's signature on its request).
#[derive(Clone, Debug)]
pub struct Gated<S> {
    inner: S,
    caller: Caller,
    check: PeerCheck,
}

impl<S> Gated<S> {
    pub fn new(check: PeerCheck, caller: Caller, inner: S) -> Self {
        Gated {
            inner,
            caller,
            check,
        }
    }

    fn admit<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        if self.check == PeerCheck::Off {
            return Ok(());
        }
        type Info =
            tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;
        let certs = request
            .extensions()
            .get::<Info>()
            .and_then(Info::peer_certs)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("this API needs a client certificate of the fleet CA")
            })?;
        match self.caller {
            Caller::Operator if names(&certs[0], OPERATOR_NAME) => Ok(()),
            Caller::Node if names_a_node(&certs[0]) => Ok(()),
            Caller::Operator => Err(Status::permission_denied(
                "only the operator's certificate may call the operator API",
            )),
            Caller::Node => Err(Status::permission_denied(
                "only a node's certificate may call this API on the peer listener",
            )),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<RB>, S::Error>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.admit(&request) {
            Ok(()) => futures_util::future::Either::Left(self.inner.call(request)),
            // The body is dropped unread: the client's stream is reset.
            Err(status) => {
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
