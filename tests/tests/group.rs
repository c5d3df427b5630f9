//! Replica groups: real `hsm-vault` processes, each on its own SoftHSM2
//! token with domain keys cloned by the ceremony, replicating with Raft over
//! loopback.

use std::time::{Duration, Instant};

use opaque_ke::ClientLogin;
use rand::rngs::OsRng;
use vault_client::{BackupKey, ClientError, RecordStatus, VaultClient};
use vault_e2e::{start_group, VaultNode};
use vault_proto::suite::Suite;
use vault_proto::vault::raft::v1 as raft_pb;
use vault_proto::vault::v1 as pb;

const PASSWORD: &[u8] = b"group password";
/// Elections take about a second; every wait is bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);

async fn client(node: &VaultNode) -> VaultClient {
    VaultClient::connect(&node.endpoint(), &node.transport(), node.pinned_key())
        .await
        .expect("connect")
}

/// Retries `op` until it succeeds or the deadline passes (while the group
/// elects a leader, nodes answer UNAVAILABLE).
async fn eventually<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() < DEADLINE => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: still failing after {DEADLINE:?}: {e}"),
        }
    }
}

/// Sends one recovery start with a wrong password; true if a KE2 came back.
async fn wrong_guess_released(endpoint: &str, pinned: [u8; 33], account: &[u8]) -> bool {
    let Ok(mut c) = VaultClient::connect_plaintext(endpoint, pinned).await else {
        return false;
    };
    let ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"wrong")
        .expect("ke1")
        .message
        .serialize()
        .to_vec();
    let answer = c
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: account.to_vec(),
            ke1,
        })
        .await;
    matches!(
        answer.map(|a| a.into_inner().outcome),
        Ok(Some(pb::recover_start_response::Outcome::Challenge(_)))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant8_record_registered_through_one_node_is_recoverable_through_any_other() {
    let nodes = start_group(3, "any");
    let keys: Vec<_> = nodes.iter().map(|n| n.pinned_key()).collect();
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "every member serves the same OPAQUE key"
    );
    let key = BackupKey::generate();
    let token = nodes[0].bearer("alice");
    eventually("register through node 1", || async {
        client(&nodes[0])
            .await
            .register_key(b"alice", &token, PASSWORD, &key, 0)
            .await
    })
    .await;
    for node in &nodes {
        let got = eventually("recover", || async {
            client(node).await.recover_key(b"alice", PASSWORD).await
        })
        .await;
        assert_eq!(got.0, key.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant2_leader_killed_loses_no_acknowledged_guess_and_service_resumes() {
    let mut nodes = start_group(3, "kill");
    let (alice, bob) = (BackupKey::generate(), BackupKey::generate());
    for (account, key) in [("alice", &alice), ("bob", &bob)] {
        let token = nodes[0].bearer(account);
        eventually("register", || async {
            client(&nodes[0])
                .await
                .register_key(account.as_bytes(), &token, PASSWORD, key, 0)
                .await
        })
        .await;
    }
    // One acknowledged wrong guess on alice.
    match client(&nodes[0])
        .await
        .recover_key(b"alice", b"wrong")
        .await
    {
        Err(ClientError::WrongPassword) => {}
        other => panic!("unexpected {other:?}"),
    }

    let leader = vault_e2e::leader_of(&nodes).await;
    nodes[leader].kill9();
    let survivor = (leader + 1) % 3;
    alice_has_left(&nodes[survivor], 9, "status after the election").await;

    // Concurrent wrong guesses on bob through both survivors: at most 10 KE2.
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut tasks = Vec::new();
    for k in 0..24 {
        let node = &nodes[survivors[k % 2]];
        let (endpoint, pinned) = (node.endpoint(), node.pinned_key());
        tasks.push(tokio::spawn(async move {
            wrong_guess_released(&endpoint, pinned, b"bob").await
        }));
    }
    let mut released = 0;
    for t in tasks {
        if t.await.expect("task") {
            released += 1;
        }
    }
    assert!(
        released <= 10,
        "{released} KE2 released for a 10-guess record"
    );
    // Alice still recovers through the survivors.
    let got = eventually("recover alice", || async {
        client(&nodes[survivors[1]])
            .await
            .recover_key(b"alice", PASSWORD)
            .await
    })
    .await;
    assert_eq!(got.0, alice.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_the_ceremony_cannot_join_or_decrypt() {
    let nodes = start_group(3, "rogue");
    let key = BackupKey::generate();
    let token = nodes[0].bearer("alice");
    eventually("register", || async {
        client(&nodes[0])
            .await
            .register_key(b"alice", &token, PASSWORD, &key, 0)
            .await
    })
    .await;

    // A token that never received the domain keys cannot start as a member.
    let mut outsider = VaultNode::unstarted("outsider", vec!["--require-cloned-keys".into()]);
    let log = outsider
        .start_process()
        .expect_err("no domain keys, no node");
    assert!(log.contains("missing"), "{log}");

    // A process with keys of its own claims membership and tries to form a
    // group with the real nodes: they refuse every message it sends.
    let ports = vault_e2e::free_ports(2);
    let (listen, peer) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
    );
    let peers = format!("{},9={peer}", nodes[0].peers_arg());
    let mut rogue = VaultNode::unstarted_at(
        "rogue-9",
        &listen,
        vec![
            "--node-id=9".into(),
            format!("--peers={peers}"),
            format!("--peer-listen={peer}"),
            "--init".into(),
        ],
    );
    rogue
        .start_process()
        .expect("the rogue runs (with keys of its own)");
    let start = Instant::now();
    loop {
        let logs: String = nodes
            .iter()
            .map(|n| std::fs::read_to_string(n.log_path()).unwrap_or_default())
            .collect();
        if logs.contains("MAC does not verify") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the rogue's messages were never refused; rogue log:\n{}",
            std::fs::read_to_string(rogue.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The real group keeps serving, and the record is what it was.
    let got = eventually("recover", || async {
        client(&nodes[1])
            .await
            .recover_key(b"alice", PASSWORD)
            .await
    })
    .await;
    assert_eq!(got.0, key.0);
}

/// A process that is not a member of the domain, posing as the leader,
/// opens an AppendEntries stream to a follower with a much higher term.
/// Its frame cannot carry the MAC of the stream's key (only the tokens make
/// that key), so the follower ends the stream UNAUTHENTICATED and takes
/// nothing from it: its term does not move, and the group keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn append_stream_frames_without_the_stream_key_are_refused() {
    use vault_proto::vault::node::v1 as node_pb;
    let nodes = start_group(3, "forged-stream");
    let key = BackupKey::generate();
    let token = nodes[0].bearer("alice");
    eventually("register", || async {
        client(&nodes[0])
            .await
            .register_key(b"alice", &token, PASSWORD, &key, 0)
            .await
    })
    .await;
    let leader = vault_e2e::leader_of(&nodes).await;
    let f = (leader + 1) % nodes.len();
    let (f_id, leader_id) = (f as u64 + 1, leader as u64 + 1);
    let peers = nodes[0].peers_arg();
    let peer = peers
        .split(',')
        .find_map(|p| p.strip_prefix(&format!("{f_id}=")))
        .expect("the follower's peer address")
        .to_owned();
    let term = || vault_e2e::metric(&nodes[f].scrape(), "vault_raft_term", &[]);
    let before = term();
    assert!(before >= 1.0, "the group has elected a leader");

    // AppendEntries as the nodes encode it, from the leader's id with a
    // term far above the group's.
    let forged_term = before as u64 + 100;
    let payload = prost::Message::encode_to_vec(&raft_pb::AppendEntriesRequest {
        vote: Some(raft_pb::Vote {
            term: forged_term,
            node: leader_id,
            committed: true,
        }),
        ..Default::default()
    });
    let frame = node_pb::RaftRequest {
        kind: "append_entries".into(),
        from: leader_id,
        to: f_id,
        group: 1,
        payload,
        mac: vec![0x5a; 32],
        nonce: vec![0x11; 16],
    };
    let mut peer_client = node_pb::node_client::NodeClient::connect(format!("http://{peer}"))
        .await
        .expect("connect to the follower's peer listener");
    let refused = match peer_client.raft_stream(tokio_stream_once(frame)).await {
        Err(status) => status,
        Ok(answers) => {
            let mut answers = answers.into_inner();
            match answers.message().await {
                Err(status) => status,
                Ok(answer) => panic!("the forged frame was answered: {answer:?}"),
            }
        }
    };
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(term(), before, "the follower took the forged term");
    let logs = std::fs::read_to_string(nodes[f].log_path()).unwrap_or_default();
    assert!(
        logs.contains("MAC does not verify"),
        "the refusal is logged"
    );
    // The group keeps serving.
    let got = eventually("recover", || async {
        client(&nodes[f])
            .await
            .recover_key(b"alice", PASSWORD)
            .await
    })
    .await;
    assert_eq!(got.0, key.0);
}

/// The last `n` lines of `node`'s log that are not openraft's own chatter.
fn log_tail(node: &VaultNode, n: usize) -> String {
    let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(" INFO openraft::") || l.contains("snapshot"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A stream of the one item `item`, kept open afterwards (as a leader's
/// stream is while it has nothing more to send).
fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let _ = tx.send(item).await;
        // Hold the sender so that the stream stays open.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tx);
    });
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One wrong password for alice through `node` (retried while the group
/// elects): the guesses left then, as alice sees them (Status; no answer to
/// a guess says).
async fn wrong_guess(node: &VaultNode, what: &str) -> u32 {
    eventually(what, || async {
        match client(node).await.recover_key(b"alice", b"wrong").await {
            Err(ClientError::WrongPassword) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => panic!("a wrong password recovered the key"),
        }
    })
    .await;
    let token = node.bearer("alice");
    match eventually(what, || async {
        client(node).await.status(b"alice", &token).await
    })
    .await
    {
        RecordStatus::Registered {
            guesses_remaining, ..
        } => guesses_remaining,
        other => panic!("{what}: {other:?}"),
    }
}

/// Waits until `node` has applied everything `leader` had applied when
/// called.
async fn applies_what_the_leader_did(node: &VaultNode, leader: &VaultNode, what: &str) {
    let applied = info(leader).await.applied_index;
    eventually(what, || async {
        if info(node).await.applied_index >= applied {
            Ok(())
        } else {
            Err(ClientError::Protocol("behind"))
        }
    })
    .await;
}

/// Waits until `node`'s log holds one of `lines` (a check it reports at
/// start), failing with `what` after [`DEADLINE`].
async fn logs_one_of(node: &VaultNode, lines: &[&str], what: &str) {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
        if lines.iter().any(|l| log.contains(l)) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The line a replica logs when its disk is not what its token vouches for.
const NOT_VOUCHED: &str = "does not match what the token vouches for";

/// Asserts, through `node` (retried while the group elects), that alice's
/// record is registered with `left` of its 10 guesses.
async fn alice_has_left(node: &VaultNode, left: u32, what: &str) {
    let token = node.bearer("alice");
    let status = eventually(what, || async {
        client(node).await.status(b"alice", &token).await
    })
    .await;
    assert_eq!(
        status,
        RecordStatus::Registered {
            guesses_remaining: left,
            max_guesses: 10
        },
        "{what}"
    );
}

/// A three-node group where alice registered, and a copy of a follower's
/// disk taken then (the follower was stopped for it and restarted): the
/// nodes, alice's key, the leader, the follower, the copy.
async fn alice_and_a_copy_of_a_follower(
    prefix: &str,
) -> (Vec<VaultNode>, BackupKey, usize, usize, tempfile::TempDir) {
    let mut nodes = start_group(3, prefix);
    let key = BackupKey::generate();
    let token = nodes[0].bearer("alice");
    eventually("register", || async {
        client(&nodes[0])
            .await
            .register_key(b"alice", &token, PASSWORD, &key, 0)
            .await
    })
    .await;
    let leader = vault_e2e::leader_of(&nodes).await;
    let f = (leader + 1) % 3;
    nodes[f].kill9();
    let old = tempfile::tempdir().expect("old copy");
    copy_dir(&nodes[f].data_dir(), old.path());
    nodes[f].restart();
    (nodes, key, leader, f, old)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for file in vault_e2e::files_under(from) {
        let dest = to.join(file.strip_prefix(from).expect("prefix"));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&file, &dest).expect("copy");
    }
}

/// A member's disk is restored from a copy taken 30 s earlier: it notices (the token
/// remembers what it committed), erases the stale state instead of voting or
/// acknowledging with it, catches up from the group, and no record gains a
/// guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_member_restored_from_an_older_copy_resyncs_and_no_record_gains_guesses() {
    let (mut nodes, _key, _leader, f, old) = alice_and_a_copy_of_a_follower("resync").await;
    let copied = Instant::now();
    // Three charges spread over the 30 s after the copy was taken: the copy
    // is 30 s old when it comes back.
    for i in 0..3u32 {
        let due = Duration::from_secs(10) * i;
        tokio::time::sleep(due.saturating_sub(copied.elapsed())).await;
        let r = wrong_guess(&nodes[f], "wrong guess").await;
        assert!(r < 10);
    }
    // Let the follower apply what was committed, then roll its disk back
    // to the copy.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(copied.elapsed())).await;
    nodes[f].kill9();
    std::fs::remove_dir_all(nodes[f].data_dir()).expect("rm");
    copy_dir(old.path(), &nodes[f].data_dir());
    nodes[f].restart();
    logs_one_of(&nodes[f], &["rolled back"], "the rollback was not detected").await;

    no_guess_was_gained(&mut nodes, f).await;
}

/// After member `f`'s disk was restored from a copy taken before three of
/// alice's guesses were charged, and `f` found out and resynced: `f`
/// serves the count of seven left, a guess through it counts, and once the
/// leader dies the survivors agree on it.
async fn no_guess_was_gained(nodes: &mut [VaultNode], f: usize) {
    alice_has_left(&nodes[f], 7, "status through the restored node").await;

    // One more charge, then the leader dies: the restored node must have
    // caught up for the survivors to serve the same count.
    match client(&nodes[f])
        .await
        .recover_key(b"alice", b"wrong")
        .await
    {
        Err(ClientError::WrongPassword) => {}
        other => panic!("unexpected {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = vault_e2e::leader_of(nodes).await;
    nodes[leader].kill9();
    let survivor = if leader == f { (f + 1) % 3 } else { f };
    alice_has_left(&nodes[survivor], 6, "status after the leader died").await;
}

/// The same restore, the host also raising `last_purged` (in `raft-meta`)
/// and `applied` (in the state machine) to the newest log id the member's
/// token vouches for. Before issue 14 that passed the log's check, which
/// trusted `last_purged` from the disk; the purge mark is now kept in the
/// token and the state checked against its anchor, so the member resyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_member_restored_with_its_purge_and_applied_marks_raised_resyncs() {
    let (mut nodes, _key, leader, f, old) = alice_and_a_copy_of_a_follower("metaedit").await;
    for _ in 0..3 {
        let r = wrong_guess(&nodes[leader], "wrong guess").await;
        assert!(r < 10);
    }
    applies_what_the_leader_did(
        &nodes[f],
        &nodes[leader],
        "the follower applies the charges",
    )
    .await;
    nodes[f].kill9();
    std::fs::remove_dir_all(nodes[f].data_dir()).expect("rm");
    copy_dir(old.path(), &nodes[f].data_dir());
    {
        let partition = nodes[f].own_partition();
        let state = partition
            .session()
            .expect("session")
            .app_state("hsm-vault/v1/raft/g1")
            .expect("the token's log state");
        let state = <raft_pb::TokenLogState as prost::Message>::decode(&state[..])
            .expect("the token's log state decodes");
        let newest = [state.last_log, state.committed]
            .into_iter()
            .flatten()
            .max_by_key(|l| l.index)
            .expect("the token vouches for a log id");
        let newest = prost::Message::encode_to_vec(&raft_pb::Applied {
            log_id: Some(newest),
        });
        let db = vault_e2e::open_store(&nodes[f].data_dir());
        db.open_tree("raft-meta/g1")
            .expect("tree")
            .insert("last_purged", newest.clone())
            .expect("edit");
        db.open_tree("raft-sm/g1")
            .expect("tree")
            .insert("applied", newest)
            .expect("edit");
        db.flush().expect("flush");
    }
    nodes[f].restart();
    logs_one_of(
        &nodes[f],
        &["rolled back", NOT_VOUCHED],
        "the edited restore was not detected",
    )
    .await;
    // Made leader once it caught up, it answers from the group's state, not
    // from the restored copy (which had all ten guesses left).
    applies_what_the_leader_did(&nodes[f], &nodes[leader], "the restored member catches up").await;
    steer_leadership_with(&mut nodes, f, "bob").await;
    alice_has_left(&nodes[f], 7, "status through the restored leader").await;
    assert_eq!(
        wrong_guess(&nodes[f], "a guess through the restored leader").await,
        6
    );
}

async fn info(node: &VaultNode) -> pb::GetInfoResponse {
    client(node)
        .await
        .raw()
        .get_info(pb::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner()
}

/// One region is cut off: the majority keeps serving, the cut-off node
/// refuses with UNAVAILABLE and says why, and after healing it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_partitioned_away_refuses_writes_and_catches_up_after_healing() {
    let nodes = start_group(3, "part");
    let key = BackupKey::generate();
    let token = nodes[0].bearer("alice");
    eventually("register", || async {
        client(&nodes[0])
            .await
            .register_key(b"alice", &token, PASSWORD, &key, 0)
            .await
    })
    .await;
    let leader = vault_e2e::leader_of(&nodes).await;
    let x = (leader + 1) % 3;
    let majority = (leader + 2) % 3;
    nodes[0].set_faults(&format!(
        r#"{{"isolated_regions": ["region-{}"]}}"#,
        x % 3 + 1
    ));

    // The cut-off node answers UNAVAILABLE with a clear message.
    let start = Instant::now();
    loop {
        match client(&nodes[x])
            .await
            .recover_key(b"alice", b"wrong")
            .await
        {
            Err(ClientError::Vault {
                code: tonic::Code::Unavailable,
                message,
            }) => {
                assert!(
                    message.contains("majority") || message.contains("cut off"),
                    "{message}"
                );
                break;
            }
            other => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "the cut-off node kept serving: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The majority side keeps serving.
    let left = wrong_guess(&nodes[majority], "guess on the majority side").await;

    // Heal; the cut-off node catches up with the leader's applied index.
    nodes[0].set_faults("{}");
    let start = Instant::now();
    loop {
        let l = vault_e2e::leader_of(&nodes).await;
        let (mine, theirs) = (
            info(&nodes[x]).await.applied_index,
            info(&nodes[l]).await.applied_index,
        );
        if mine >= theirs && mine > 0 {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "node {x} stuck at {mine}, leader at {theirs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = nodes[x].bearer("alice");
    let status = eventually("status", || async {
        client(&nodes[x]).await.status(b"alice", &token).await
    })
    .await;
    assert_eq!(
        status,
        RecordStatus::Registered {
            guesses_remaining: left,
            max_guesses: 10
        }
    );
}

/// Five nodes in three regions; the leader is killed with SIGKILL in the
/// middle of a stream of registrations and guesses. Every acknowledged
/// registration survives, service resumes after the election, and the
/// attacked record never releases more than 10 KE2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant8_leader_killed_during_a_stream_loses_no_acknowledged_write_and_no_extra_guess() {
    let mut nodes = start_group(5, "stream");
    let target_key = BackupKey::generate();
    let token = nodes[0].bearer("target");
    eventually("register the target", || async {
        client(&nodes[0])
            .await
            .register_key(b"target", &token, PASSWORD, &target_key, 0)
            .await
    })
    .await;
    let endpoints: Vec<(String, [u8; 33])> = nodes
        .iter()
        .map(|n| (n.endpoint(), n.pinned_key()))
        .collect();
    let bearers: Vec<String> = (0..40)
        .map(|i| nodes[0].bearer(&format!("user-{i}")))
        .collect();
    let stop_at = Instant::now() + Duration::from_secs(8);

    // Registrations, spread over the nodes, recording what was acknowledged.
    let writer = {
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for (i, bearer) in bearers.iter().enumerate() {
                if Instant::now() > stop_at {
                    break;
                }
                let (endpoint, pinned) = &endpoints[i % endpoints.len()];
                let key = BackupKey::generate();
                if let Ok(mut c) = VaultClient::connect_plaintext(endpoint, *pinned).await {
                    let account = format!("user-{i}");
                    if c.register_key(account.as_bytes(), bearer, PASSWORD, &key, 0)
                        .await
                        .is_ok()
                    {
                        acked.push((account, key));
                    }
                }
            }
            acked
        })
    };
    // Wrong guesses on the target, counting the KE2 released.
    let guesser = {
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let mut released = 0u32;
            let mut i = 0;
            while Instant::now() < stop_at {
                i += 1;
                let (endpoint, pinned) = &endpoints[i % endpoints.len()];
                if wrong_guess_released(endpoint, *pinned, b"target").await {
                    released += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            released
        })
    };

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = vault_e2e::leader_of(&nodes).await;
    nodes[leader].kill9();

    let acked = writer.await.expect("writer");
    let released = guesser.await.expect("guesser");
    assert!(
        released <= 10,
        "{released} KE2 released for a 10-guess record"
    );
    assert!(!acked.is_empty(), "some registrations were acknowledged");
    let survivor = (leader + 1) % 5;
    for (account, key) in &acked {
        let got = eventually("recover an acknowledged registration", || async {
            client(&nodes[survivor])
                .await
                .recover_key(account.as_bytes(), PASSWORD)
                .await
        })
        .await;
        assert_eq!(got.0, key.0, "{account}");
    }
    let token = nodes[survivor].bearer("target");
    let status = eventually("target status", || async {
        client(&nodes[survivor])
            .await
            .status(b"target", &token)
            .await
    })
    .await;
    match status {
        RecordStatus::Registered {
            guesses_remaining, ..
        } => {
            assert!(
                guesses_remaining <= 10 - released,
                "{guesses_remaining} left after {released} KE2"
            )
        }
        // Locked after fewer than 10 KE2 reached the client is allowed: a
        // charge can commit while its answer is lost in the crash.
        RecordStatus::Locked => assert!(released <= 10),
        RecordStatus::NotRegistered => panic!("the target record was lost"),
    }
}

/// Two replica groups of three: records are spread over them by the shard
/// map, any node serves any account (forwarding across groups, a KE3 routed
/// by its login id), each record lives in exactly one group, and a guess
/// charged through the other group counts on the one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant2_two_groups_split_the_records_and_any_node_serves_any_account() {
    use hsm_vault::replication::state_machine::record_ids_in;
    use hsm_vault::shard::ShardMap;
    use std::collections::BTreeSet;

    let mut nodes = vault_e2e::prepare_fleet(&[3, 3], "shard");
    // The fleet file splits the slots evenly over groups 1 and 2: pick three
    // accounts each group holds (record ids come from the shared token keys).
    let map = ShardMap::even(1, &[1, 2]);
    let mut accounts: Vec<(String, u64, [u8; 32])> = Vec::new();
    {
        let inspector = nodes[0].inspector();
        for i in 0.. {
            let name = format!("user-{i}");
            let id = inspector.record_id(&name).0;
            let group = map.group_of(&id).expect("covered");
            if accounts.iter().filter(|a| a.1 == group).count() < 3 {
                accounts.push((name, group, id));
            }
            if accounts.len() == 6 {
                break;
            }
        }
    }
    for node in &mut nodes {
        node.restart();
    }
    // Nodes 1-3 are group 1, nodes 4-6 group 2.
    fn members(nodes: &[VaultNode], g: u64) -> &[VaultNode] {
        if g == 1 {
            &nodes[0..3]
        } else {
            &nodes[3..6]
        }
    }
    let in_group = |g: u64| members(&nodes, g);
    let keys: Vec<BackupKey> = accounts.iter().map(|_| BackupKey::generate()).collect();
    for (i, ((name, group, _), key)) in accounts.iter().zip(&keys).enumerate() {
        // Registered through a node of the other group.
        let through = &in_group(3 - group)[i % 3];
        let token = through.bearer(name);
        eventually("register across groups", || async {
            client(through)
                .await
                .register_key(name.as_bytes(), &token, PASSWORD, key, 0)
                .await
        })
        .await;
    }
    for (i, ((name, group, _), key)) in accounts.iter().zip(&keys).enumerate() {
        for through in [&in_group(*group)[i % 3], &in_group(3 - group)[(i + 1) % 3]] {
            let got = eventually("recover", || async {
                client(through)
                    .await
                    .recover_key(name.as_bytes(), PASSWORD)
                    .await
            })
            .await;
            assert_eq!(got.0, key.0, "{name} through node {}", through.endpoint());
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let info = client(node)
            .await
            .raw()
            .get_info(pb::GetInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.group_id, if i < 3 { 1 } else { 2 });
        assert_eq!(info.shard_map_version, 1);
    }

    // A wrong guess started through group 2 on a group-1 account, its KE3
    // sent to another node of group 2: the login id routes it home.
    let (name, _, _) = accounts.iter().find(|a| a.1 == 1).expect("group 1 account");
    let ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"wrong")
        .expect("ke1")
        .message
        .serialize()
        .to_vec();
    let started = client(&nodes[3])
        .await
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: name.as_bytes().to_vec(),
            ke1,
        })
        .await
        .expect("start")
        .into_inner();
    let Some(pb::recover_start_response::Outcome::Challenge(challenge)) = started.outcome else {
        panic!("a KE2 for the first wrong guess");
    };
    assert_eq!(challenge.login_id.len(), 24);
    assert_eq!(
        challenge.login_id[..8],
        1u64.to_be_bytes(),
        "served by group 1"
    );
    let finished = client(&nodes[5])
        .await
        .raw()
        .recover_finish(pb::RecoverFinishRequest {
            login_id: challenge.login_id,
            ke3: Vec::new(),
        })
        .await
        .expect("finish routed by its login id")
        .into_inner();
    assert!(matches!(
        finished.outcome,
        Some(pb::recover_finish_response::Outcome::WrongPassword(
            pb::WrongPassword {}
        ))
    ));
    let status = client(&nodes[1])
        .await
        .status(name.as_bytes(), &nodes[1].bearer(name))
        .await
        .expect("status");
    assert!(
        matches!(
            status,
            RecordStatus::Registered {
                guesses_remaining: 9,
                ..
            }
        ),
        "one counter, charged once: {status:?}"
    );

    // Each record is stored in its own group only.
    for node in &mut nodes {
        node.kill9();
    }
    for group in [1u64, 2] {
        let want: BTreeSet<[u8; 32]> = accounts
            .iter()
            .filter(|a| a.1 == group)
            .map(|a| a.2)
            .collect();
        for node in members(&nodes, group) {
            let db = vault_e2e::open_store(&node.data_dir());
            let held: BTreeSet<[u8; 32]> = record_ids_in(&db, &format!("g{group}"))
                .expect("state machine")
                .into_iter()
                .collect();
            let other = record_ids_in(&db, &format!("g{}", 3 - group))
                .expect("state machine")
                .len();
            assert!(
                held.is_subset(&want),
                "group {group} holds a foreign record"
            );
            assert_eq!(
                other, 0,
                "a node of group {group} holds the other group's state"
            );
        }
        // The group holds every one of its records (its leader applied them
        // all; a follower may be a heartbeat behind when killed).
        let union: BTreeSet<[u8; 32]> = members(&nodes, group)
            .iter()
            .flat_map(|n| {
                let db = vault_e2e::open_store(&n.data_dir());
                record_ids_in(&db, &format!("g{group}")).expect("state machine")
            })
            .collect();
        assert_eq!(union, want, "group {group} holds exactly its records");
    }
}

/// Members 80 ms apart one way (a 160 ms round trip, past the 100 ms a
/// heartbeat interval once allowed each AppendEntries): whichever member
/// leads, the group commits. With a fixed 100 ms heartbeat every
/// replication timed out and, once a far member led, the group stalled.
///
/// Leadership is steered, not left to chance: openraft draws a node's
/// election timeout once per process, so a member never restarted can lose
/// every election. To hand leadership to `t`, the third member `o` is cut
/// off while a recovery commits on the leader and `t` (so `o`'s log is
/// behind and `o` cannot win), the leader is killed, `o` is reconnected:
/// only `t` can then be elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant8_a_group_whose_members_are_a_long_round_trip_apart_commits_under_each_leader() {
    let regions: Vec<String> = ["near", "far", "farther"].map(str::to_owned).into();
    let layout = vault_e2e::Layout {
        intra_region_ms: 1,
        links: vec![
            (regions[0].clone(), regions[1].clone(), 80),
            (regions[0].clone(), regions[2].clone(), 80),
            (regions[1].clone(), regions[2].clone(), 80),
        ],
        nodes: regions.iter().map(|r| (r.clone(), 1)).collect(),
        regions,
    };
    let mut nodes = vault_e2e::prepare_layout(&layout, "far");
    for n in &mut nodes {
        n.restart();
    }
    let token = nodes[0].bearer("faraway");
    let key = BackupKey::generate();
    eventually("register", || async {
        client(&nodes[0])
            .await
            .register_key(b"faraway", &token, PASSWORD, &key, 0)
            .await
    })
    .await;
    async fn recover(node: &VaultNode) -> BackupKey {
        eventually("recover", || async {
            client(node).await.recover_key(b"faraway", PASSWORD).await
        })
        .await
    }
    let write = async |n: &VaultNode| assert_eq!(recover(n).await.0, key.0);
    for t in 0..nodes.len() {
        steer_leadership_to(&mut nodes, t, &write).await;
        // Under this leader a recovery commits its guess, entered through
        // a follower (forwarded over the long links) and through the leader.
        assert_eq!(recover(&nodes[(t + 1) % nodes.len()]).await.0, key.0);
        assert_eq!(recover(&nodes[t]).await.0, key.0);
        let applied = info(&nodes[t]).await.applied_index;
        eventually("every member applies the leader's entries", || async {
            for n in &nodes {
                if info(n).await.applied_index < applied {
                    return Err(ClientError::Protocol("a member is behind"));
                }
            }
            Ok(())
        })
        .await;
    }
}

/// Makes member `t` the leader of a three-node group: the third member is
/// cut off (fault switch) while `write` commits on the leader and `t` only,
/// then the leader is killed and the third member reconnected: its log is
/// behind, so only `t` can be elected. The killed leader is restarted.
async fn steer_leadership_to(nodes: &mut [VaultNode], t: usize, write: impl AsyncFn(&VaultNode)) {
    let start = Instant::now();
    let l = vault_e2e::leader_of(nodes).await;
    if l == t {
        return;
    }
    let o = (0..nodes.len())
        .find(|i| *i != l && *i != t)
        .expect("three members");
    nodes[o].set_faults(&format!(r#"{{"isolated_nodes":[{}]}}"#, o + 1));
    tokio::time::sleep(hsm_vault::geo::FAULTS_POLL * 5).await;
    write(&nodes[t]).await;
    // `t` learns of the commit with the leader's next message.
    while info(&nodes[o]).await.applied_index >= info(&nodes[t]).await.applied_index {
        assert!(start.elapsed() < DEADLINE, "node {o} was not cut off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes[l].kill9();
    nodes[o].set_faults("{}");
    loop {
        let now = info(&nodes[o]).await;
        if now.leader_id == t as u64 + 1 && info(&nodes[t]).await.leader_id == t as u64 + 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "node {t} not elected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes[l].restart();
    assert_eq!(vault_e2e::leader_of(nodes).await, t);
}

/// [`steer_leadership_to`] member `t`, committing a registration of
/// `account` (one of the group's) as the write.
async fn steer_leadership_with(nodes: &mut [VaultNode], t: usize, account: &str) {
    let token = nodes[0].bearer(account);
    let write = async |n: &VaultNode| {
        eventually("the steering write", || async {
            client(n)
                .await
                .register_key(
                    account.as_bytes(),
                    &token,
                    PASSWORD,
                    &BackupKey::generate(),
                    0,
                )
                .await
        })
        .await;
    };
    steer_leadership_to(nodes, t, &write).await;
}

/// The splice attack on a replica (issue 14), with real processes: alice's
/// record is locked by 10 wrong guesses; the host of a follower, stopped,
/// puts the records of its state machine back to a copy of its disk taken
/// while the record was still registered (the applied index, membership and
/// log left alone) and restarts it. The follower finds that its state is
/// not what its token vouches for, erases it and resyncs; made leader, it
/// answers "locked", releases no KE2 and never the secret. At most 10 KE2s
/// are released for the record across the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant3_a_locked_record_spliced_back_into_a_replica_never_releases_its_secret() {
    let (mut nodes, _key, leader, f, old) = alice_and_a_copy_of_a_follower("splice").await;

    // Ten wrong passwords lock the record: ten KE2s released.
    let mut released = 0;
    for _ in 0..10 {
        match eventually("wrong guess", || async {
            client(&nodes[leader])
                .await
                .recover_key(b"alice", b"wrong")
                .await
                .map(|_| panic!("a wrong password recovered the key"))
                .or_else(|e| match e {
                    ClientError::WrongPassword | ClientError::Locked => Ok(e),
                    e => Err(e),
                })
        })
        .await
        {
            ClientError::WrongPassword | ClientError::Locked => released += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(
        client(&nodes[leader])
            .await
            .recover_key(b"alice", PASSWORD)
            .await,
        Err(ClientError::Locked)
    ));
    // The follower applies the lockout, then its host splices.
    applies_what_the_leader_did(
        &nodes[f],
        &nodes[leader],
        "the follower applies the lockout",
    )
    .await;
    nodes[f].kill9();
    {
        let stale = vault_e2e::open_store(old.path());
        let live = vault_e2e::open_store(&nodes[f].data_dir());
        let (from, to) = (
            stale.open_tree("raft-sm/g1").expect("tree"),
            live.open_tree("raft-sm/g1").expect("tree"),
        );
        let mut spliced = 0;
        for item in from.iter() {
            let (k, v) = item.expect("record");
            if k.len() == 32 {
                assert_ne!(to.get(&k).expect("read").as_deref(), Some(v.as_ref()));
                to.insert(k, v).expect("splice");
                spliced += 1;
            }
        }
        assert_eq!(spliced, 1, "alice's registered copy was spliced back");
        live.flush().expect("flush");
    }
    nodes[f].restart();
    logs_one_of(
        &nodes[f],
        &[NOT_VOUCHED],
        "the splice was not detected at open",
    )
    .await;

    // Leadership steered to the spliced member (once it caught up again).
    applies_what_the_leader_did(&nodes[f], &nodes[leader], "the spliced member catches up").await;
    steer_leadership_with(&mut nodes, f, "bob").await;

    // Through the spliced member, now the leader: locked, and no KE2.
    assert!(
        matches!(
            eventually("recover through the spliced leader", || async {
                match client(&nodes[f])
                    .await
                    .recover_key(b"alice", PASSWORD)
                    .await
                {
                    Err(ClientError::Locked) => Ok(Err(ClientError::Locked)),
                    Ok(k) => Ok(Ok(k)),
                    Err(e) => Err(e),
                }
            })
            .await,
            Err(ClientError::Locked)
        ),
        "the locked record's secret came back"
    );
    for _ in 0..10 {
        if wrong_guess_released(&nodes[f].endpoint(), nodes[f].pinned_key(), b"alice").await {
            released += 1;
        }
    }
    assert!(
        released <= 10,
        "{released} KE2s released for a 10-guess record"
    );
}

/// A leader that started a login, then was cut off while the group moved on
/// (three more wrong guesses charged under a new leader), must not finish
/// that login with a count from its stale view: "wrong password, 8 left"
/// would be an answer no write backs. It confirms its leadership first and
/// answers UNAVAILABLE (or ABORTED), never `WrongPassword` or `Locked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant2_a_deposed_leader_does_not_finish_a_login_from_its_stale_view() {
    let (nodes, _key, old_leader, f, _old) = alice_and_a_copy_of_a_follower("deposed").await;
    let pinned = nodes[old_leader].pinned_key();
    let mut raw = VaultClient::connect_plaintext(&nodes[old_leader].endpoint(), pinned)
        .await
        .expect("connect");
    let ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"wrong")
        .expect("ke1")
        .message
        .serialize()
        .to_vec();
    let login_id = match raw
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: b"alice".to_vec(),
            ke1,
        })
        .await
        .expect("recover start")
        .into_inner()
        .outcome
    {
        Some(pb::recover_start_response::Outcome::Challenge(c)) => c.login_id,
        other => panic!("unexpected {other:?}"),
    };
    // The leader is cut off; the others elect a new one and charge three
    // more wrong guesses.
    nodes[old_leader].set_faults(&format!(r#"{{"isolated_nodes":[{}]}}"#, old_leader + 1));
    for _ in 0..3 {
        let r = wrong_guess(&nodes[f], "a wrong guess under the new leader").await;
        assert!(r < 9);
    }
    // The old leader still believes it leads; its view says 9 left.
    let finished = raw
        .raw()
        .recover_finish(pb::RecoverFinishRequest {
            login_id,
            ke3: Vec::new(),
        })
        .await;
    match finished {
        Err(status) => assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Aborted
            ),
            "{status:?}"
        ),
        Ok(answer) => panic!(
            "a cut-off leader answered from its stale view: {:?}",
            answer.into_inner().outcome
        ),
    }
}

/// How a host edits the snapshot a member sends (its `snapshot-data`, MAC
/// left as it was).
#[derive(Clone, Copy, Debug)]
enum SnapshotEdit {
    /// One byte of the last record's sealed bytes.
    Record,
    /// The header's shard map version (1 → 7, same length).
    Map,
}

/// A member whose disk lost everything catches up from the leader's
/// snapshot; the leader's host has edited that snapshot on disk. The
/// receiver refuses it (its token MAC no longer matches), does not stop, and
/// keeps serving through its leader; once the leader has a snapshot of its
/// own again, the receiver installs that one and catches up.
async fn edited_snapshot_is_refused_and_its_receiver_keeps_serving(
    prefix: &str,
    edit: SnapshotEdit,
) {
    use hsm_vault::replication::state_machine::{parse_snapshot, SNAPSHOT_MAGIC};
    const EVERY: u64 = 60;
    let mut nodes = vault_e2e::prepare_fleet(&[3], prefix);
    for node in &mut nodes {
        node.extra_args.push(format!("--snapshot-every={EVERY}"));
        node.restart();
    }
    let key = BackupKey::generate();
    let token = nodes[0].bearer("alice");
    eventually("register", || async {
        client(&nodes[0])
            .await
            .register_key(b"alice", &token, PASSWORD, &key, 0)
            .await
    })
    .await;
    // Entries until every member has taken a snapshot (and purged the start
    // of its log behind it): a member with an empty disk now needs one.
    let fill = async |nodes: &[VaultNode], until: u64| {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            let mut lowest = u64::MAX;
            for n in nodes {
                lowest = lowest.min(info(n).await.snapshot_index);
            }
            if lowest >= until {
                return;
            }
            assert!(start.elapsed() < DEADLINE * 4, "no snapshot at {until}");
            for _ in 0..5 {
                i += 1;
                let account = format!("filler-{until}-{i}");
                wrong_guess_released(
                    &nodes[0].endpoint(),
                    nodes[0].pinned_key(),
                    account.as_bytes(),
                )
                .await;
            }
        }
    };
    fill(&nodes, EVERY).await;
    let leader = vault_e2e::leader_of(&nodes).await;
    let (s, f) = ((leader + 1) % 3, (leader + 2) % 3);

    // The host of `s` edits its snapshot while it is stopped: the open check
    // covers the state, not the snapshot blob, so `s` starts as before.
    nodes[s].kill9();
    {
        let db = vault_e2e::open_store(&nodes[s].data_dir());
        let tree = db.open_tree("raft-sm/g1").expect("tree");
        let mut data = tree
            .get("snapshot-data")
            .expect("read")
            .expect("a snapshot on disk")
            .to_vec();
        let parsed = parse_snapshot(&data).expect("parses");
        assert!(!parsed.records.is_empty(), "the snapshot holds records");
        let header_at = SNAPSHOT_MAGIC.len() + 32 + 4;
        let header_end = header_at + parsed.header_bytes.len();
        match edit {
            SnapshotEdit::Record => {
                let last = data.len() - 1;
                data[last] ^= 1;
            }
            SnapshotEdit::Map => {
                let mut header = <raft_pb::SnapshotHeader as prost::Message>::decode(
                    &data[header_at..header_end],
                )
                .expect("the header decodes");
                let map = header.shard_map.as_mut().expect("a shard map");
                assert_eq!(map.version, 1, "its version");
                map.version = 7;
                let edited = prost::Message::encode_to_vec(&header);
                assert_eq!(edited.len(), header_end - header_at, "the same length");
                data[header_at..header_end].copy_from_slice(&edited);
            }
        }
        tree.insert("snapshot-data", data).expect("edit");
        db.flush().expect("flush");
    }
    nodes[s].restart();
    steer_leadership_with(&mut nodes, s, "bob").await;
    let taken = info(&nodes[s]).await.snapshot_index;

    // `f` loses its disk: it needs the leader's (edited) snapshot.
    nodes[f].kill9();
    std::fs::remove_dir_all(nodes[f].data_dir()).expect("rm");
    std::fs::create_dir_all(nodes[f].data_dir()).expect("mkdir");
    nodes[f].restart();
    let start = Instant::now();
    while vault_e2e::metric(&nodes[f].scrape(), "vault_snapshots_refused_total", &[]) < 1.0 {
        assert!(
            start.elapsed() < DEADLINE,
            "{edit:?}: the edited snapshot was not refused; the sender's log ends:\n{}\nthe \
             receiver's:\n{}",
            log_tail(&nodes[s], 60),
            log_tail(&nodes[f], 60)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        info(&nodes[s]).await.snapshot_index,
        taken,
        "the leader sent the snapshot its host edited"
    );
    assert!(nodes[f].is_running(), "the receiver stopped");
    assert!(info(&nodes[f]).await.applied_index < info(&nodes[s]).await.applied_index);
    // It serves through its leader meanwhile.
    let token = nodes[f].bearer("alice");
    assert_eq!(
        eventually("status through the receiver", || async {
            client(&nodes[f]).await.status(b"alice", &token).await
        })
        .await,
        RecordStatus::Registered {
            guesses_remaining: 10,
            max_guesses: 10
        }
    );
    let got = eventually("recover through the receiver", || async {
        client(&nodes[f])
            .await
            .recover_key(b"alice", PASSWORD)
            .await
    })
    .await;
    assert_eq!(got.0, key.0);

    // The leader's next snapshot is its own: the receiver installs it.
    fill(&nodes[s..=s], taken + EVERY).await;
    let start = Instant::now();
    loop {
        let (want, got) = (info(&nodes[s]).await, info(&nodes[f]).await);
        if got.applied_index >= want.snapshot_index && got.snapshot_index > 0 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the receiver did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(nodes[f].is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_a_snapshot_with_a_record_edited_is_refused_and_its_receiver_keeps_serving() {
    edited_snapshot_is_refused_and_its_receiver_keeps_serving("snaprec", SnapshotEdit::Record)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_a_snapshot_with_its_map_edited_is_refused_and_its_receiver_keeps_serving() {
    edited_snapshot_is_refused_and_its_receiver_keeps_serving("snapmap", SnapshotEdit::Map).await;
}

/// A recovery start for `account` through `node` with a made-up KE1: the
/// outcome, or the status it was refused with.
async fn start_login(
    node: &VaultNode,
    account: &[u8],
) -> Result<Option<pb::recover_start_response::Outcome>, tonic::Status> {
    let ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"a guess")
        .expect("ke1")
        .message
        .serialize()
        .to_vec();
    client(node)
        .await
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: account.to_vec(),
            ke1,
        })
        .await
        .map(|r| r.into_inner().outcome)
}

/// Whether `node` refuses `account` because its record is moving.
async fn refused_as_moving(node: &VaultNode, account: &[u8]) -> bool {
    match start_login(node, account).await {
        Err(s) => s.code() == tonic::Code::Unavailable && s.message().contains("moving"),
        Ok(outcome) => panic!("served a record that is moving: {outcome:?}"),
    }
}

/// During a move of slots out of group 1 (frozen there, not handed over
/// yet), the host of a group-1 member deletes its `frozen-map`. Without it
/// the member, once leader, would serve and charge the moving records while
/// the other group may already hold them (two counters for one record). It
/// finds that its state is not what its token vouches for, resyncs, and made
/// leader it still refuses the moving records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant2_a_member_whose_frozen_map_was_deleted_during_a_move_does_not_serve_the_moving_slots(
) {
    use hsm_vault::replication::operator::Reshard;
    use hsm_vault::shard::{slot, ShardMap};
    use vault_proto::vault::node::v1 as node_pb;

    let mut nodes = vault_e2e::prepare_fleet(&[3, 1], "frozenmove");
    let map = ShardMap::even(1, &[1, 2]);
    // Two group-1 accounts: alice's slot moves, bob's stays.
    let (alice, bob) = {
        let inspector = nodes[0].inspector();
        let mut in_group_1 = (0..)
            .map(|i| format!("user-{i}"))
            .map(|name| (inspector.record_id(&name).0, name))
            .filter(|(id, _)| map.group_of(id) == Some(1));
        let alice = in_group_1.next().expect("an account");
        let bob = in_group_1
            .find(|(id, _)| slot(id) != slot(&alice.0))
            .expect("an account");
        (alice, bob)
    };
    let operator = p256::ecdsa::SigningKey::random(&mut OsRng);
    let key_file = nodes[0].token.dir().join("operator.pub");
    std::fs::write(
        &key_file,
        hex::encode(operator.verifying_key().to_encoded_point(true).as_bytes()),
    )
    .expect("operator key");
    for node in &mut nodes {
        node.extra_args
            .push(format!("--operator-public-key={}", key_file.display()));
        node.restart();
    }
    let token = nodes[0].bearer(&alice.1);
    eventually("register alice", || async {
        client(&nodes[0])
            .await
            .register_key(
                alice.1.as_bytes(),
                &token,
                PASSWORD,
                &BackupKey::generate(),
                0,
            )
            .await
    })
    .await;

    // The first step of the move: group 1 freezes alice's slot.
    let next = map.reassign(slot(&alice.0), slot(&alice.0), 2, 2);
    let body = serde_json::to_vec(&Reshard::Freeze { map: next }).expect("json");
    let peer_addr = |n: &VaultNode| {
        n.extra_args
            .iter()
            .find_map(|a| a.strip_prefix("--peer-listen="))
            .expect("a peer listener")
            .to_owned()
    };
    let start = Instant::now();
    'frozen: loop {
        for (i, n) in nodes[0..3].iter().enumerate() {
            let issued_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let target = vault_proto::operator::Target {
                node: i as u64 + 1,
                group: 1,
            };
            let request = vault_proto::operator::request(
                &operator,
                "Reshard",
                target,
                issued_at,
                body.clone(),
            );
            let Ok(channel) =
                tonic::transport::Channel::from_shared(format!("http://{}", peer_addr(n)))
                    .expect("uri")
                    .connect()
                    .await
            else {
                continue;
            };
            if node_pb::operator_client::OperatorClient::new(channel)
                .reshard(request)
                .await
                .is_ok()
            {
                break 'frozen;
            }
        }
        assert!(start.elapsed() < DEADLINE, "the freeze was not committed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refused_as_moving(&nodes[0], alice.1.as_bytes()).await);

    // The host of a group-1 follower deletes its frozen map.
    let group_1 = &mut nodes[0..3];
    let leader = vault_e2e::leader_of(group_1).await;
    let f = (leader + 1) % 3;
    applies_what_the_leader_did(
        &group_1[f],
        &group_1[leader],
        "the follower applies the freeze",
    )
    .await;
    group_1[f].kill9();
    {
        let db = vault_e2e::open_store(&group_1[f].data_dir());
        let removed = db
            .open_tree("raft-sm/g1")
            .expect("tree")
            .remove("frozen-map")
            .expect("edit");
        assert!(removed.is_some(), "the follower held the frozen map");
        db.flush().expect("flush");
    }
    group_1[f].restart();
    logs_one_of(
        &group_1[f],
        &[NOT_VOUCHED],
        "the deleted frozen map was not detected at open",
    )
    .await;

    // Made leader, it still refuses alice's record, and serves bob's.
    steer_leadership_with(group_1, f, &bob.1).await;
    assert!(refused_as_moving(&group_1[f], alice.1.as_bytes()).await);
    assert!(matches!(
        start_login(&group_1[f], bob.1.as_bytes()).await,
        Ok(Some(pb::recover_start_response::Outcome::Challenge(_)))
    ));
}
