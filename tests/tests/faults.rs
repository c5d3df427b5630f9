//! Crashes, tampering, rollback and bad input against a real vault process:
//! invariants 1, 7 and 9.

use opaque_ke::ClientLogin;
use rand::rngs::OsRng;
use rand::RngCore;
use tonic::Code;
use vault_client::{BackupKey, ClientError, RecordStatus, VaultClient};
use vault_e2e::{files_under, VaultNode};
use vault_proto::suite::Suite;
use vault_proto::vault::v1 as pb;

const PASSWORD: &[u8] = b"hunter2 but longer";

async fn register(node: &VaultNode, account: &str) -> BackupKey {
    let key = BackupKey::generate();
    node.client()
        .await
        .register_key(account.as_bytes(), &node.bearer(account), PASSWORD, &key, 0)
        .await
        .expect("register");
    key
}

fn ke1(password: &[u8]) -> Vec<u8> {
    ClientLogin::<Suite>::start(&mut OsRng, password)
        .expect("start")
        .message
        .serialize()
        .to_vec()
}

async fn start_raw(c: &mut VaultClient, account: &str) -> pb::RecoverStartResponse {
    c.raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: account.as_bytes().to_vec(),
            ke1: ke1(b"a wrong guess"),
        })
        .await
        .expect("recover start")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant1_guess_charged_before_ke2_survives_sigkill() {
    let mut node = VaultNode::start("crash");
    let key = register(&node, "alice").await;
    for expected_left in [9u32, 8, 7] {
        let mut c = node.client().await;
        let answer = start_raw(&mut c, "alice").await;
        let Some(pb::recover_start_response::Outcome::Challenge(_)) = answer.outcome else {
            panic!("expected a KE2");
        };
        // The KE2 is in our hands: kill the vault before any KE3.
        node.kill9();
        node.restart();
        let status = node
            .client()
            .await
            .status(b"alice", &node.bearer("alice"))
            .await
            .expect("status");
        assert_eq!(
            status,
            RecordStatus::Registered {
                guesses_remaining: expected_left,
                max_guesses: 10
            },
            "the guess whose KE2 was released must still count after kill -9"
        );
    }
    // The right password still works and resets the counter.
    let mut c = node.client().await;
    assert_eq!(
        c.recover_key(b"alice", PASSWORD).await.expect("recover").0,
        key.0
    );
}

/// Finds every occurrence of `needle` in the files under `dir` and flips one
/// bit in the middle of each.
fn flip_in_files(dir: &std::path::Path, needle: &[u8]) -> usize {
    let mut flipped = 0;
    for entry in files_under(dir) {
        if entry
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("snap."))
        {
            continue;
        }
        let mut bytes = std::fs::read(&entry).expect("read store file");
        let mut changed = false;
        let mut i = 0;
        while i + needle.len() <= bytes.len() {
            if bytes[i..i + needle.len()] == *needle {
                bytes[i + needle.len() / 2] ^= 0x01;
                changed = true;
                flipped += 1;
                i += needle.len();
            } else {
                i += 1;
            }
        }
        if changed {
            std::fs::write(&entry, &bytes).expect("write store file");
        }
    }
    flipped
}

async fn expect_data_loss(node: &VaultNode, account: &str) {
    let mut c = node.client().await;
    let err = c
        .recover_key(account.as_bytes(), PASSWORD)
        .await
        .expect_err("tampered record");
    match err {
        ClientError::Vault { code, message } => {
            assert_eq!(code, Code::DataLoss, "{message}");
            assert!(message.contains("integrity"), "{message}");
        }
        other => panic!("expected DATA_LOSS, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_flipped_byte_or_moved_record_is_refused_while_others_are_served() {
    let mut node = VaultNode::start("tamper");
    let mut keys = Vec::new();
    for account in ["flip", "moved", "source", "bystander"] {
        keys.push((account, register(&node, account).await));
    }
    node.kill9();

    // Edit the stored records behind the vault's back, keeping sled's own
    // checksums valid (as an attacker who rewrites the files would).
    let inspector = node.inspector();
    {
        let db = vault_e2e::open_store(&node.data_dir());
        let source = db
            .get(inspector.record_id("source").0)
            .expect("read")
            .expect("present");
        db.insert(inspector.record_id("moved").0, source.to_vec())
            .expect("copy over another id");
        let flip_id = inspector.record_id("flip").0;
        let mut flipped = db.get(flip_id).expect("read").expect("present").to_vec();
        flipped[100] ^= 0x01;
        db.insert(flip_id, flipped).expect("flip a byte");
        db.flush().expect("flush");
    }
    drop(inspector);

    node.restart();
    expect_data_loss(&node, "flip").await;
    expect_data_loss(&node, "moved").await;
    // Everyone else keeps being served, and the process is alive.
    let mut c = node.client().await;
    for (account, key) in &keys[2..] {
        assert_eq!(
            c.recover_key(account.as_bytes(), PASSWORD)
                .await
                .expect("served")
                .0,
            key.0
        );
    }
    assert!(node.is_running());
    // The owner can re-register over a damaged record.
    let fresh = BackupKey::generate();
    c.register_key(b"flip", &node.bearer("flip"), b"new", &fresh, 0)
        .await
        .expect("re-register");
    assert_eq!(
        c.recover_key(b"flip", b"new").await.expect("recover").0,
        fresh.0
    );
}

/// A bit flipped in sled's raw files breaks sled's own checksums, which it
/// checks when it opens the store: the node must fail closed with a clear
/// message, never serve, never panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_flipped_byte_in_raw_store_files_fails_closed_with_a_clear_message() {
    let mut node = VaultNode::start("rawflip");
    register(&node, "alice").await;
    register(&node, "bob").await;
    node.kill9();
    let inspector = node.inspector();
    let sealed = {
        let db = vault_e2e::open_store(&node.data_dir());
        db.get(inspector.record_id("alice").0)
            .expect("read")
            .expect("present")
            .to_vec()
    };
    drop(inspector);
    assert!(
        flip_in_files(&node.data_dir(), &sealed[20..60]) > 0,
        "record bytes found on disk"
    );
    let log = node
        .start_process()
        .expect_err("a corrupted store must not be served");
    assert!(
        log.contains("corrupt"),
        "clear message expected, log was:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for file in files_under(from) {
        let rel = file.strip_prefix(from).expect("prefix");
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&file, &dest).expect("copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_storage_restored_from_older_copy_is_refused() {
    let mut node = VaultNode::start("rollback");
    register(&node, "alice").await;
    node.kill9();
    let snapshot = tempfile::tempdir().expect("snapshot dir");
    copy_dir(&node.data_dir(), snapshot.path());

    // Later: guesses are charged.
    node.restart();
    let mut c = node.client().await;
    for _ in 0..3 {
        assert!(c.recover_key(b"alice", b"wrong").await.is_err());
    }
    node.kill9();

    // The host restores the old copy to win its guesses back.
    std::fs::remove_dir_all(node.data_dir()).expect("remove");
    copy_dir(snapshot.path(), &node.data_dir());
    let log = node
        .start_process()
        .expect_err("a rolled-back store must not be served");
    assert!(
        log.contains("rolled back"),
        "clear message expected, log was:\n{log}"
    );
}

fn authed<T>(token: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(resp) => panic!("expected an error, got {resp:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "every error says what was wrong");
            s.code()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant9_malformed_oversized_and_out_of_order_messages_get_precise_errors() {
    let node = VaultNode::start("badinput");
    let key = register(&node, "alice").await;
    let mut c = node.client().await;
    let token = node.bearer("alice");
    let with_token = |m| authed(&token, m);
    let with_token2 = |m| authed(&token, m);
    let mut junk = vec![0u8; 96];
    OsRng.fill_bytes(&mut junk);
    let rpc = c.raw();

    // Malformed and oversized fields: INVALID_ARGUMENT.
    for (account, ke1_bytes) in [
        (Vec::new(), ke1(b"x")),
        (vec![b'a'; 257], ke1(b"x")),
        (b"alice".to_vec(), Vec::new()),
        (b"alice".to_vec(), junk.clone()),
        (b"alice".to_vec(), vec![0xff; 4096]),
        (b"alice".to_vec(), ke1(b"x")[..50].to_vec()),
    ] {
        let r = rpc
            .recover_start(pb::RecoverStartRequest {
                account_id: account,
                ke1: ke1_bytes,
            })
            .await;
        assert_eq!(code_of(r), Code::InvalidArgument);
    }
    // Junk, and a valid request with bytes after it (the parser reads one
    // point and would ignore them): only the exact encoding is taken.
    let mut padded = opaque_ke::ClientRegistration::<Suite>::start(&mut OsRng, b"pw")
        .expect("registration start")
        .message
        .serialize()
        .to_vec();
    padded.extend_from_slice(&[0; 8]);
    for request in [junk.clone(), padded] {
        let r = rpc
            .register_start(with_token(pb::RegisterStartRequest {
                account_id: b"alice".to_vec(),
                registration_request: request,
            }))
            .await;
        assert_eq!(code_of(r), Code::InvalidArgument);
    }
    for (upload, secret, max) in [
        (junk.clone(), vec![1u8; 60], 0),
        (vec![7u8; 192], vec![1u8; 60], 0),
    ] {
        let r = rpc
            .register_finish(with_token2(pb::RegisterFinishRequest {
                account_id: b"alice".to_vec(),
                registration_upload: upload,
                secret,
                max_guesses: max,
                registration_id: vec![0; 16],
            }))
            .await;
        assert_eq!(code_of(r), Code::InvalidArgument);
    }
    let r = rpc
        .recover_finish(pb::RecoverFinishRequest {
            login_id: vec![1, 2, 3],
            ke3: vec![0; 32],
        })
        .await;
    assert_eq!(code_of(r), Code::InvalidArgument);

    // Out of order: a KE3 for a login that was never started, or twice.
    let r = rpc
        .recover_finish(pb::RecoverFinishRequest {
            login_id: vec![9; 24],
            ke3: vec![0; 32],
        })
        .await;
    assert_eq!(code_of(r), Code::FailedPrecondition);
    let started = rpc
        .recover_start(pb::RecoverStartRequest {
            account_id: b"alice".to_vec(),
            ke1: ke1(b"x"),
        })
        .await
        .expect("start")
        .into_inner();
    let Some(pb::recover_start_response::Outcome::Challenge(ch)) = started.outcome else {
        panic!("expected a challenge");
    };
    let r = rpc
        .recover_finish(pb::RecoverFinishRequest {
            login_id: ch.login_id.clone(),
            ke3: vec![0; 5],
        })
        .await;
    assert_eq!(
        code_of(r),
        Code::InvalidArgument,
        "a KE3 of the wrong length"
    );
    rpc.recover_finish(pb::RecoverFinishRequest {
        login_id: ch.login_id.clone(),
        ke3: vec![0; 32],
    })
    .await
    .expect("first finish is answered");
    let r = rpc
        .recover_finish(pb::RecoverFinishRequest {
            login_id: ch.login_id,
            ke3: vec![0; 32],
        })
        .await;
    assert_eq!(
        code_of(r),
        Code::FailedPrecondition,
        "a login is single use"
    );

    // A message over the transport limit is refused before decoding.
    let r = rpc
        .recover_start(pb::RecoverStartRequest {
            account_id: vec![b'a'; 100_000],
            ke1: ke1(b"x"),
        })
        .await;
    assert_eq!(code_of(r), Code::OutOfRange);

    // A KE1 whose ephemeral key is -G (so C + G is the point at infinity)
    // is refused before any guess is charged.
    let before = c
        .status(b"alice", &node.bearer("alice"))
        .await
        .expect("status");
    let minus_g = {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        (-p256::ProjectivePoint::GENERATOR)
            .to_affine()
            .to_encoded_point(true)
    };
    let mut bad_ke1 = ke1(b"x");
    bad_ke1[65..98].copy_from_slice(minus_g.as_bytes());
    let r = c
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: b"alice".to_vec(),
            ke1: bad_ke1,
        })
        .await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    let after = c
        .status(b"alice", &node.bearer("alice"))
        .await
        .expect("status");
    assert_eq!(before, after, "no guess charged for an unusable KE1");

    // The service kept serving through all of it.
    match c.recover_key(b"alice", b"another wrong").await {
        Err(ClientError::WrongPassword) => {}
        other => panic!("unexpected {other:?}"),
    }
    let Ok(RecordStatus::Registered {
        guesses_remaining: left,
        ..
    }) = c.status(b"alice", &node.bearer("alice")).await
    else {
        panic!("alice's record is registered");
    };
    assert!(left >= 5);
    assert_eq!(
        c.recover_key(b"alice", PASSWORD).await.expect("served").0,
        key.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant8_acknowledged_writes_survive_sigkill() {
    let mut node = VaultNode::start("acked");
    let mut keys = Vec::new();
    for i in 0..8 {
        let account = format!("user-{i}");
        keys.push((account.clone(), register(&node, &account).await));
    }
    // Acknowledged guesses on half of them, a deletion on one.
    let mut c = node.client().await;
    for (account, _) in &keys[..4] {
        for _ in 0..2 {
            assert!(matches!(
                c.recover_key(account.as_bytes(), b"wrong").await,
                Err(ClientError::WrongPassword)
            ));
        }
    }
    c.delete(b"user-7", &node.bearer("user-7"), PASSWORD)
        .await
        .expect("delete");
    node.kill9();
    node.restart();

    let mut c = node.client().await;
    for (i, (account, key)) in keys.iter().enumerate() {
        let status = c
            .status(account.as_bytes(), &node.bearer(account))
            .await
            .expect("status");
        let expected = match i {
            7 => RecordStatus::NotRegistered,
            0..=3 => RecordStatus::Registered {
                guesses_remaining: 8,
                max_guesses: 10,
            },
            _ => RecordStatus::Registered {
                guesses_remaining: 10,
                max_guesses: 10,
            },
        };
        assert_eq!(status, expected, "{account}");
        if i != 7 {
            assert_eq!(
                c.recover_key(account.as_bytes(), PASSWORD)
                    .await
                    .expect("recover")
                    .0,
                key.0
            );
        }
    }
}

/// The host splices back an older copy of one record (to win back its
/// guesses): that record is refused on its own. If it also rolls the
/// record's index entry back, the node refuses to serve at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant7_one_record_rolled_back_is_detected() {
    let mut node = VaultNode::start("rollback-one");
    register(&node, "alice").await;
    let bob = register(&node, "bob").await;
    node.kill9();
    let inspector = node.inspector();
    let alice = inspector.record_id("alice");
    let mut index_key = vec![b'i'];
    index_key.extend_from_slice(&alice.0);
    let (old_record, old_index) = {
        let db = vault_e2e::open_store(&node.data_dir());
        let r = db.get(alice.0).expect("read").expect("record");
        let i = db.get(&index_key).expect("read").expect("index");
        (r.to_vec(), i.to_vec())
    };
    drop(inspector);

    node.restart();
    let mut c = node.client().await;
    for _ in 0..3 {
        assert!(matches!(
            c.recover_key(b"alice", b"wrong").await,
            Err(ClientError::WrongPassword)
        ));
    }
    node.kill9();

    // Splice back the old record only.
    {
        let db = vault_e2e::open_store(&node.data_dir());
        db.insert(alice.0, old_record).expect("splice");
        db.flush().expect("flush");
    }
    node.restart();
    let mut c = node.client().await;
    match c.recover_key(b"alice", PASSWORD).await {
        Err(ClientError::Vault { code, message }) => {
            assert_eq!(code, Code::DataLoss, "{message}");
            assert!(message.contains("older copy"), "{message}");
        }
        other => panic!("a rolled-back record must not be served: {other:?}"),
    }
    assert_eq!(
        c.recover_key(b"bob", PASSWORD).await.expect("bob served").0,
        bob.0
    );
    node.kill9();

    // Roll the index entry back too: the digest in the token no longer
    // matches, and the node refuses to serve.
    {
        let db = vault_e2e::open_store(&node.data_dir());
        db.insert(index_key, old_index).expect("splice index");
        db.flush().expect("flush");
    }
    let log = node
        .start_process()
        .expect_err("a store whose index was rolled back must not be served");
    assert!(
        log.contains("does not match the digest kept in the token"),
        "{log}"
    );
}

/// A crash between the steps of a group commit leaves a store the token
/// accepts: before the flush, the write is simply absent (it was never
/// acknowledged); after the flush, the commit is completed on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant8_crash_inside_a_group_commit_recovers() {
    for (point, survives) in [("after-anchor-pending", false), ("after-flush", true)] {
        let mut node = VaultNode::start(&format!("crash-{point}"));
        let key = register(&node, "alice").await;
        node.kill9();
        node.extra_env = vec![("HSM_VAULT_CRASH_POINT".into(), point.into())];
        node.restart();
        let mut c = node.client().await;
        let r = c
            .register_key(b"carol", &node.bearer("carol"), PASSWORD, &key, 0)
            .await;
        assert!(r.is_err(), "{point}: the write was not acknowledged");
        node.wait_for_exit(std::time::Duration::from_secs(10));
        node.extra_env.clear();
        node.restart();
        let mut c = node.client().await;
        let status = c
            .status(b"carol", &node.bearer("carol"))
            .await
            .expect("status");
        let expected = if survives {
            RecordStatus::Registered {
                guesses_remaining: 10,
                max_guesses: 10,
            }
        } else {
            RecordStatus::NotRegistered
        };
        assert_eq!(status, expected, "{point}");
        assert_eq!(
            c.recover_key(b"alice", PASSWORD).await.expect("alice").0,
            key.0,
            "{point}"
        );
    }
}
