//! TLS on the wire: the client API over TLS (the node's certificate checked
//! against the fleet CA), the peer listener — node-to-node API, operator API,
//! forwarded requests — over mutual TLS, where only certificates of the
//! fleet CA get through the handshake and each API takes only the
//! certificate of its caller (`operator`, `node-<id>`). Plaintext only when
//! asked for by name.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tonic::Code;
use vault_client::backup::BackupKey;
use vault_client::{ClientError, VaultClient};
use vault_e2e::{bin, fleet_tool, free_ports, peer_channel, Certs, FleetDown, VaultNode};
use vault_proto::vault::node::v1 as node_pb;
use vault_proto::vault::node::v1::node_client::NodeClient;
use vault_proto::vault::node::v1::operator_client::OperatorClient;
use vault_proto::vault::v1::vault_client::VaultClient as RawVaultClient;

const PASSWORD: &[u8] = b"correct horse battery staple";
const DEADLINE: Duration = Duration::from_secs(30);

fn ca_pem(node: &VaultNode) -> Vec<u8> {
    std::fs::read(node.certs().expect("a TLS node").ca()).expect("CA")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn tls_client_registers_and_recovers_a_key_over_tls() {
    let node = VaultNode::start_tls("tls-one");
    assert!(node.endpoint().starts_with("https://"));
    let key = BackupKey::generate();
    let mut client = VaultClient::connect_tls(&node.endpoint(), &ca_pem(&node), node.pinned_key())
        .await
        .expect("TLS client connects");
    client
        .register_key(b"tess", &node.bearer("tess"), PASSWORD, &key, 0)
        .await
        .expect("register over TLS");
    match client.recover_key(b"tess", b"wrong").await {
        Err(ClientError::WrongPassword) => {}
        other => panic!("a wrong guess is charged over TLS too: {other:?}"),
    }
    let got = client
        .recover_key(b"tess", PASSWORD)
        .await
        .expect("recover over TLS");
    assert_eq!(got.0, key.0);

    // The CLI over TLS, with the CA from VAULT_CA_CERT.
    let mut recover = node.cli();
    recover.args(["key", "recover", "--account", "tess", "--password-stdin"]);
    let out = vault_e2e::run_with_stdin(recover, "correct horse battery staple\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        key.to_hex().as_str()
    );

    // The server's private key never shows in the node's log.
    let log = std::fs::read_to_string(node.log_path()).expect("log");
    let key_pem = std::fs::read_to_string(node.certs().expect("certs").server(1).1).expect("key");
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!log.contains(&body[..32]), "TLS key material in the log");
}

#[tokio::test]
async fn tls_client_without_the_fleet_ca_or_over_plaintext_is_refused() {
    let node = VaultNode::start_tls("tls-refuse");
    let endpoint = node.endpoint();
    let other = tempfile::tempdir().expect("dir");
    let other_ca = Certs::issue(&other.path().join("tls"), &[1]);

    // A CA that did not issue the node's certificate.
    let pem = std::fs::read(other_ca.ca()).expect("CA");
    match VaultClient::connect_tls(&endpoint, &pem, node.pinned_key()).await {
        Err(ClientError::Unreachable { detail, .. }) => {
            assert!(detail.contains("certificate"), "{detail}")
        }
        other => panic!("a vault certificate from an unknown CA is refused: {other:?}"),
    }
    // Plaintext to the TLS port gets no answer.
    let plain = endpoint.replace("https://", "http://");
    assert!(matches!(
        VaultClient::connect_plaintext(&plain, node.pinned_key()).await,
        Err(ClientError::Unreachable { .. })
    ));
    // TLS is never downgraded to an http:// endpoint.
    assert!(matches!(
        VaultClient::connect_tls(&plain, &ca_pem(&node), node.pinned_key()).await,
        Err(ClientError::BadEndpoint(_))
    ));

    // The CLI: an http:// endpoint without --plaintext, https without a CA,
    // and the wrong CA.
    let recover = |endpoint: &str, ca: Option<&Path>| {
        let mut c = Command::new(bin("vault"));
        c.env("VAULT_ENDPOINT", endpoint)
            .env("VAULT_PUBLIC_KEY", node.public_key_path())
            .args(["key", "recover", "--account", "x", "--password-stdin"]);
        if let Some(ca) = ca {
            c.env("VAULT_CA_CERT", ca);
        }
        vault_e2e::run_with_stdin(c, "pw\n")
    };
    let out = recover(&plain, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("without TLS"), "{}", stderr(&out));
    let out = recover(&endpoint, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--ca-cert"), "{}", stderr(&out));
    let out = recover(&endpoint, Some(&other_ca.ca()));
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vault unreachable"),
        "{}",
        stderr(&out)
    );
}

/// Starts `hsm-vault` with `args` on a throwaway identity key and PIN and
/// returns its output once it exits (it must refuse to start).
fn refused_start(args: &[String]) -> String {
    let work = tempfile::tempdir().expect("dir");
    let identity = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    std::fs::write(
        work.path().join("jwks.json"),
        vault_proto::token::jwks(&[*identity.verifying_key()]),
    )
    .expect("identity");
    let mut child = Command::new(bin("hsm-vault"))
        .env("HSM_VAULT_PIN", "0000")
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--data-dir={}", work.path().join("data").display()))
        .arg("--token-label=none")
        .arg(format!(
            "--auth-jwks={}",
            work.path().join("jwks.json").display()
        ))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    while child.try_wait().expect("poll").is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the node started without its TLS material");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "it must not listen"
    );
    stderr(&out)
}

#[test]
fn tls_node_refuses_to_start_without_certificates_unless_plaintext() {
    let err = refused_start(&[]);
    assert!(
        err.contains("no TLS certificate") && err.contains("--plaintext"),
        "{err}"
    );
    // A group member also needs the fleet CA and its client certificate.
    let certs_dir = tempfile::tempdir().expect("dir");
    let certs = Certs::issue(certs_dir.path(), &[1]);
    let (cert, key) = certs.server(1);
    let err = refused_start(&[
        "--node-id=1".into(),
        "--peers=1=127.0.0.1:1".into(),
        "--peer-listen=127.0.0.1:1".into(),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ]);
    assert!(err.contains("mutual TLS"), "{err}");
    // --plaintext and TLS material do not mix.
    let err = refused_start(&[
        "--plaintext".into(),
        format!("--tls-cert={}", cert.display()),
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// A one-node fleet made by `fleet up` (TLS, operator API enabled).
struct OneNode {
    /// Dropped first (fields drop in order): `fleet down` needs the
    /// directory's state.
    _down: FleetDown,
    dir: PathBuf,
    peer_addr: String,
    _work: tempfile::TempDir,
}

impl OneNode {
    fn up() -> OneNode {
        let work = tempfile::tempdir().expect("dir");
        let dir = work.path().join("fleet");
        let ports = free_ports(2);
        let fleet_file = work.path().join("fleet.toml");
        let peer_addr = format!("127.0.0.1:{}", ports[1]);
        std::fs::write(
            &fleet_file,
            format!(
                "[fleet]\nname = \"t\"\n[[region]]\nname = \"eu\"\n[[node]]\nid = 1\nregion = \"eu\"\n\
                 addr = \"127.0.0.1:{}\"\npeer_addr = \"{peer_addr}\"\n",
                ports[0]
            ),
        )
        .expect("fleet file");
        let down = FleetDown(dir.clone());
        let up = fleet_tool(
            &dir,
            &["up", "--fleet-file", fleet_file.to_str().expect("utf8")],
        );
        assert!(up.status.success(), "{}", stderr(&up));
        OneNode {
            _down: down,
            dir,
            peer_addr,
            _work: work,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    fn operator_cert(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.join("tls/operator");
        (d.join("client.pem"), d.join("client.key"))
    }

    fn node_cert(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.join("tls/node-1");
        (d.join("client.pem"), d.join("client.key"))
    }

    /// The node's process id, as `fleet up` recorded it.
    fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("state.json")).expect("state");
        let state: serde_json::Value = serde_json::from_str(&text).expect("state json");
        let pid = state["nodes"]["1"]["pid"].as_u64().expect("node 1 pid");
        u32::try_from(pid).expect("pid")
    }

    /// `Reshard::Show`, signed by the operator's key: a valid request.
    fn signed_show(&self) -> node_pb::OperatorRequest {
        let text = std::fs::read_to_string(self.dir.join("operator/operator.key")).expect("key");
        let key = vault_proto::token::parse_signing_key(&text).expect("operator key");
        let issued_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let target = vault_proto::operator::Target { node: 1, group: 1 };
        vault_proto::operator::request(&key, "Reshard", target, issued_at, br#""Show""#.to_vec())
    }

    /// The operator API's answer to a valid signed request, reached with
    /// `client` (certificate and key) or none; retried while the group
    /// elects itself.
    async fn operator_call(&self, client: Option<&(PathBuf, PathBuf)>) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let result = async {
                let channel = peer_channel(&self.ca(), client, 1, &self.peer_addr).await?;
                OperatorClient::new(channel)
                    .reshard(self.signed_show())
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            }
            .await;
            match result {
                Err(e) if e.contains("not the group's leader") && start.elapsed() < DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => return other,
            }
        }
    }

    /// A Raft message from node `from` (with a MAC that cannot verify),
    /// sent with `client` (certificate and key) or none.
    /// With node 1's own certificate, a Raft message from node 1 goes
    /// through TLS and the certificate check to the token MAC check, which
    /// refuses its made-up MAC.
    async fn node_api_reachable_with_the_node_certificate(&self) {
        let (code, e) = self
            .raft_call(Some(&self.node_cert()), 1)
            .await
            .expect_err("a made-up MAC");
        assert_eq!(code, Some(Code::Unauthenticated), "{e}");
        assert!(e.contains("MAC does not verify"), "{e}");
    }

    async fn raft_call(
        &self,
        client: Option<&(PathBuf, PathBuf)>,
        from: u64,
    ) -> Result<(), (Option<Code>, String)> {
        let channel = peer_channel(&self.ca(), client, 1, &self.peer_addr)
            .await
            .map_err(|e| (None, e))?;
        NodeClient::new(channel)
            .raft(node_pb::RaftRequest {
                kind: "vote".into(),
                group: 1,
                from,
                to: 1,
                payload: b"{}".to_vec(),
                mac: vec![0; 32],
                nonce: vec![0; 16],
            })
            .await
            .map(|_| ())
            .map_err(|s| (Some(s.code()), s.message().to_owned()))
    }
}

/// A refusal in the TLS handshake: the call never reached a service (so no
/// status a service sends). Each test first shows that the same call with
/// a valid certificate does reach it, so the refusal is the certificate's.
fn refused_in_handshake(e: &str) {
    for service_word in ["PermissionDenied", "Unauthenticated", "signature", "leader"] {
        assert!(!e.contains(service_word), "reached the service: {e}");
    }
}

#[tokio::test]
async fn tls_operator_api_refuses_a_client_without_a_certificate() {
    let fleet = OneNode::up();
    // The same signed request works with the operator's certificate...
    fleet
        .operator_call(Some(&fleet.operator_cert()))
        .await
        .expect("the operator's certificate is accepted");
    // ...and never gets through without one.
    let e = fleet
        .operator_call(None)
        .await
        .expect_err("no client certificate, no operator API");
    refused_in_handshake(&e);
}

#[tokio::test]
async fn tls_operator_api_refuses_a_certificate_from_another_ca() {
    let fleet = OneNode::up();
    fleet
        .operator_call(Some(&fleet.operator_cert()))
        .await
        .expect("the operator's certificate is accepted");
    let other = tempfile::tempdir().expect("dir");
    let stranger = Certs::issue(&other.path().join("tls"), &[1]);
    for cert in [stranger.operator(), stranger.client(1)] {
        let e = fleet
            .operator_call(Some(&cert))
            .await
            .expect_err("a certificate of another CA is refused");
        refused_in_handshake(&e);
    }
}

#[tokio::test]
async fn tls_operator_api_accepts_only_the_operator_certificate() {
    let fleet = OneNode::up();
    let e = fleet
        .operator_call(Some(&fleet.node_cert()))
        .await
        .expect_err("a node's certificate is not the operator's");
    assert!(e.starts_with("PermissionDenied"), "{e}");
    fleet
        .operator_call(Some(&fleet.operator_cert()))
        .await
        .expect("the operator's certificate is accepted");
}

/// A signed operator request is taken once, by the node it names: played
/// again (as whoever captured it might) it is refused, and so is one signed
/// for another node or group.
#[tokio::test]
async fn tls_operator_requests_are_refused_when_replayed_or_sent_to_another_node() {
    let fleet = OneNode::up();
    fleet
        .operator_call(Some(&fleet.operator_cert()))
        .await
        .expect("the operator's certificate is accepted");
    let channel = peer_channel(
        &fleet.ca(),
        Some(&fleet.operator_cert()),
        1,
        &fleet.peer_addr,
    )
    .await
    .expect("connect");
    let mut c = OperatorClient::new(channel);
    let request = fleet.signed_show();
    c.reshard(request.clone()).await.expect("taken once");
    let replayed = c.reshard(request).await.expect_err("replayed");
    assert_eq!(replayed.code(), Code::Unauthenticated, "{replayed:?}");
    assert!(replayed.message().contains("replayed"), "{replayed:?}");

    let text = std::fs::read_to_string(fleet.dir.join("operator/operator.key")).expect("key");
    let key = vault_proto::token::parse_signing_key(&text).expect("operator key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for (node, group) in [(2, 1), (1, 2)] {
        let target = vault_proto::operator::Target { node, group };
        let elsewhere =
            vault_proto::operator::request(&key, "Reshard", target, now, br#""Show""#.to_vec());
        let refused = c.reshard(elsewhere).await.expect_err("not for this node");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
}

/// The most memory the process `pid` has held (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A holder of a fleet certificate that is not the operator's (here a
/// node's) sends a 200 MiB operator message: it is refused from the
/// request's head, before the body is buffered or decoded, so the node's
/// peak memory does not grow by the message; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_operator_api_refuses_a_large_message_before_reading_it() {
    let fleet = OneNode::up();
    fleet
        .operator_call(Some(&fleet.operator_cert()))
        .await
        .expect("the operator's certificate is accepted");
    let pid = fleet.pid();
    let before = peak_rss_kib(pid);
    let channel = peer_channel(&fleet.ca(), Some(&fleet.node_cert()), 1, &fleet.peer_addr)
        .await
        .expect("a node's certificate gets through the handshake");
    let big = node_pb::OperatorRequest {
        body: vec![7; 200 << 20],
        ..Default::default()
    };
    let status = OperatorClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .reshard(big)
        .await
        .expect_err("a node's certificate is not the operator's");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let after = peak_rss_kib(pid);
    // The bound: well under the message, above the noise of a TLS
    // connection's buffers.
    assert!(
        after < before + 48 * 1024,
        "the node buffered the message: peak memory {before} KiB -> {after} KiB"
    );
    fleet
        .operator_call(Some(&fleet.operator_cert()))
        .await
        .expect("the node keeps serving the operator");
}

/// The client API on the peer listener is for forwarding nodes: a holder
/// of another certificate of the fleet CA (here the operator's) cannot
/// send requests there marked as forwarded (which the node would take as
/// already limited at their entry, with the client address they claim).
#[tokio::test]
async fn tls_forwarded_requests_are_taken_only_from_node_certificates() {
    let fleet = OneNode::up();
    let ke1 = opaque_ke::ClientLogin::<vault_proto::suite::Suite>::start(
        &mut rand::rngs::OsRng,
        b"any password",
    )
    .expect("KE1")
    .message
    .serialize()
    .to_vec();
    let start = |ke1: Vec<u8>| {
        let mut request = tonic::Request::new(vault_proto::vault::v1::RecoverStartRequest {
            account_id: b"someone".to_vec(),
            ke1,
        });
        let meta = request.metadata_mut();
        meta.insert("x-vault-forwarded", "leader".parse().expect("mark"));
        meta.insert("x-vault-client-addr", "192.0.2.1".parse().expect("addr"));
        request
    };
    let call = |cert: (PathBuf, PathBuf), ke1: Vec<u8>| {
        let fleet = &fleet;
        async move {
            let channel = peer_channel(&fleet.ca(), Some(&cert), 1, &fleet.peer_addr)
                .await
                .expect("through the handshake");
            RawVaultClient::new(channel).recover_start(start(ke1)).await
        }
    };
    let status = call(fleet.operator_cert(), ke1.clone())
        .await
        .expect_err("the operator is not a node");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // A node's certificate gets its forwarded start served (retried while
    // the one-node group elects itself).
    let start_time = Instant::now();
    loop {
        match call(fleet.node_cert(), ke1.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && start_time.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("a node's forwarded start: {s:?}"),
        }
    }
}

#[tokio::test]
async fn tls_node_api_refuses_a_client_without_a_certificate() {
    let fleet = OneNode::up();
    fleet.node_api_reachable_with_the_node_certificate().await;
    let (code, e) = fleet
        .raft_call(None, 1)
        .await
        .expect_err("no client certificate, no node API");
    assert_ne!(code, Some(Code::Unauthenticated), "{e}");
    refused_in_handshake(&e);
    assert!(!e.contains("MAC"), "reached the service: {e}");
}

#[tokio::test]
async fn tls_node_api_refuses_a_certificate_from_another_ca() {
    let fleet = OneNode::up();
    fleet.node_api_reachable_with_the_node_certificate().await;
    let other = tempfile::tempdir().expect("dir");
    let stranger = Certs::issue(&other.path().join("tls"), &[1]);
    let (_, e) = fleet
        .raft_call(Some(&stranger.client(1)), 1)
        .await
        .expect_err("a node certificate of another CA is refused");
    refused_in_handshake(&e);
    assert!(!e.contains("MAC"), "reached the service: {e}");
}

#[tokio::test]
async fn tls_node_api_accepts_only_the_certificate_of_the_sending_node() {
    let fleet = OneNode::up();
    // node-1's certificate, a message from node 1: through TLS and the
    // certificate check, then refused by the token MAC check (the MAC is
    // made up) — the two layers stand on their own.
    fleet.node_api_reachable_with_the_node_certificate().await;
    // node-1's certificate claiming to be node 2, or the operator's.
    for (cert, from) in [(fleet.node_cert(), 2), (fleet.operator_cert(), 1)] {
        let (code, e) = fleet
            .raft_call(Some(&cert), from)
            .await
            .expect_err("not this sender's certificate");
        assert_eq!(code, Some(Code::PermissionDenied), "{e}");
    }
}

/// A replica group over mutual TLS (fixtures): registrations through every
/// node, each forwarded to the leader over the peer listeners, recovered
/// through another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_replica_group_replicates_and_forwards_over_mutual_tls() {
    let nodes = vault_e2e::start_tls_fleet(&[3], "tls-group");
    for (i, node) in nodes.iter().enumerate() {
        assert!(node.endpoint().starts_with("https://"));
        let account = format!("acct-{i}");
        let key = BackupKey::generate();
        let token = node.bearer(&account);
        let start = Instant::now();
        loop {
            let done = async {
                node.client()
                    .await
                    .register_key(account.as_bytes(), &token, PASSWORD, &key, 0)
                    .await
            }
            .await;
            match done {
                Ok(_) => break,
                Err(e) if start.elapsed() < DEADLINE => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("register through node {}: {e}", i + 1),
            }
        }
        let other = &nodes[(i + 1) % nodes.len()];
        let got = other
            .client()
            .await
            .recover_key(account.as_bytes(), PASSWORD)
            .await
            .expect("recover through another node");
        assert_eq!(got.0, key.0);
    }
}

/// One address cannot hold more than `MAX_PEER_CONNECTIONS` connections
/// open to a peer listener (which takes any certificate of the fleet CA
/// through its handshake): the one past the bound is closed at once, and a
/// connection is taken again once one closes. Plaintext here, so the bound
/// is seen without TLS in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_listener_bounds_the_connections_one_address_holds_open() {
    use std::io::Read;
    let nodes = vault_e2e::start_group(1, "conncap");
    let peer_addr = nodes[0]
        .extra_args
        .iter()
        .find_map(|a| a.strip_prefix("--peer-listen="))
        .expect("a peer listener")
        .to_owned();
    let cap = hsm_vault::proxy::MAX_PEER_CONNECTIONS;
    // Whether the server closed `conn` (EOF) within a short wait.
    let closed = |conn: &mut std::net::TcpStream| {
        conn.set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        matches!(conn.read(&mut [0u8; 1]), Ok(0))
    };
    // The node's own connections to itself, if any, count too: fill up to
    // the bound, whatever is already open.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..cap + 8 {
        let mut conn = std::net::TcpStream::connect(&peer_addr).expect("connect");
        if closed(&mut conn) {
            refused = Some(held.len());
            break;
        }
        held.push(conn);
    }
    let taken = refused.expect("a connection past the bound is closed");
    assert!(
        taken <= cap && taken + 8 >= cap,
        "{taken} connections taken"
    );
    // One closes; a new one is taken.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = std::net::TcpStream::connect(&peer_addr).expect("connect");
    assert!(!closed(&mut again), "a slot given back is taken again");
}
