//! Registration and recovery against a real vault process on a real
//! SoftHSM2 token: invariants 2–5 and the owner checks.

use std::collections::HashSet;

use hsm_vault::core::record::RecordBody;
use hsm_vault::core::record::SealedRecord;
use opaque_ke::{ClientLogin, ClientLoginFinishParameters, CredentialResponse};
use rand::rngs::OsRng;
use vault_client::{BackupKey, ClientError, RecordStatus};
use vault_e2e::VaultNode;
use vault_proto::suite::{client_ksf, Suite};
use vault_proto::vault::v1 as pb;

const PASSWORD: &[u8] = b"correct horse battery staple";

async fn registered(label: &str, account: &str) -> (VaultNode, BackupKey) {
    registered_with(label, account, Vec::new()).await
}

async fn registered_with(label: &str, account: &str, args: Vec<String>) -> (VaultNode, BackupKey) {
    let mut node = VaultNode::unstarted(label, args);
    node.restart();
    let key = BackupKey::generate();
    let max = node
        .client()
        .await
        .register_key(account.as_bytes(), &node.bearer(account), PASSWORD, &key, 0)
        .await
        .expect("register");
    assert_eq!(max, 10);
    (node, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant4_register_then_recover_returns_the_same_key() {
    let (node, key) = registered("rt", "alice").await;
    let mut c = node.client().await;
    for _ in 0..3 {
        let got = c.recover_key(b"alice", PASSWORD).await.expect("recover");
        assert_eq!(got.0, key.0);
    }
    // Re-registering (a new password) replaces the record.
    let key2 = BackupKey::generate();
    c.register_key(b"alice", &node.bearer("alice"), b"new password", &key2, 3)
        .await
        .expect("re-register");
    assert!(matches!(
        c.recover_key(b"alice", PASSWORD).await,
        Err(ClientError::WrongPassword)
    ));
    assert_eq!(remaining(&mut c, &node, "alice").await, 2);
    assert_eq!(
        c.recover_key(b"alice", b"new password")
            .await
            .expect("recover")
            .0,
        key2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant3_ten_wrong_passwords_lock_and_destroy_the_secret() {
    let (mut node, _key) = registered("lock", "bob").await;
    let mut c = node.client().await;
    for i in 1..=10u32 {
        match c.recover_key(b"bob", b"wrong").await {
            Err(ClientError::WrongPassword) => {
                assert_eq!(remaining(&mut c, &node, "bob").await, 10 - i)
            }
            Err(ClientError::Locked) => assert_eq!(i, 10, "locked too early"),
            other => panic!("guess {i}: unexpected {other:?}"),
        }
    }
    assert!(matches!(
        c.recover_key(b"bob", PASSWORD).await,
        Err(ClientError::Locked)
    ));
    assert!(matches!(
        c.recover_key(b"bob", PASSWORD).await,
        Err(ClientError::Locked)
    ));
    assert_eq!(
        c.status(b"bob", &node.bearer("bob")).await.expect("status"),
        RecordStatus::Locked
    );

    // Look at what is stored: the record unseals as Locked, with no secret.
    node.kill9();
    let inspector = node.inspector();
    let id = inspector.record_id("bob");
    let db = vault_e2e::open_store(&node.data_dir());
    let bytes = db.get(id.0).expect("read").expect("record present");
    let session = inspector.partition.session().expect("session");
    let (_, record) = inspector
        .core
        .inspect(&session, &id, &SealedRecord::from_stored(bytes.to_vec()))
        .expect("unseal");
    assert!(matches!(record.body, RecordBody::Locked), "{record:?}");
    assert_eq!(record.guesses_remaining(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant4_nine_wrong_then_right_recovers_and_resets_to_ten() {
    let (node, key) = registered("nine", "carol").await;
    let mut c = node.client().await;
    for i in 1..=9u32 {
        match c.recover_key(b"carol", b"nope").await {
            Err(ClientError::WrongPassword) => {
                assert_eq!(remaining(&mut c, &node, "carol").await, 10 - i)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        c.recover_key(b"carol", PASSWORD).await.expect("recover").0,
        key.0
    );
    assert_eq!(
        c.status(b"carol", &node.bearer("carol"))
            .await
            .expect("status"),
        RecordStatus::Registered {
            guesses_remaining: 10,
            max_guesses: 10
        }
    );
}

/// Guesses left on `account`'s record, as its owner sees them (Status):
/// no other answer says.
async fn remaining(c: &mut vault_client::VaultClient, node: &VaultNode, account: &str) -> u32 {
    match c
        .status(account.as_bytes(), &node.bearer(account))
        .await
        .expect("status")
    {
        RecordStatus::Registered {
            guesses_remaining, ..
        } => guesses_remaining,
        other => panic!("{account}: {other:?}"),
    }
}

/// Sends a KE1 for `password` by hand: the vault's answer, and the client
/// state that finishes it.
async fn start_answer(
    c: &mut vault_client::VaultClient,
    account: &str,
    password: &[u8],
) -> (pb::RecoverStartResponse, ClientLogin<Suite>) {
    let start = ClientLogin::<Suite>::start(&mut OsRng, password).expect("start");
    let answer = c
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: account.as_bytes().to_vec(),
            ke1: start.message.serialize().to_vec(),
        })
        .await
        .expect("recover start")
        .into_inner();
    (answer, start.state)
}

/// Runs KE1 → KE2 by hand and returns what the vault answered.
async fn raw_start(
    c: &mut vault_client::VaultClient,
    account: &str,
    password: &[u8],
) -> (pb::Challenge, ClientLogin<Suite>) {
    let (answer, state) = start_answer(c, account, password).await;
    match answer.outcome {
        Some(pb::recover_start_response::Outcome::Challenge(ch)) => (ch, state),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant5_unknown_account_gets_a_well_formed_ke2_and_fails_like_a_wrong_password() {
    let (node, _key) = registered("enum", "dave").await;
    let mut c = node.client().await;
    let ksf = client_ksf();
    let mut answers = Vec::new();
    for account in ["dave", "nobody-at-all"] {
        let (challenge, state) = raw_start(&mut c, account, b"guess").await;
        // Same sizes, and the KE2 parses as an RFC 9807 message.
        let ke2 =
            CredentialResponse::<Suite>::deserialize(&challenge.ke2).expect("well-formed KE2");
        let client = state.finish(
            &mut OsRng,
            b"guess",
            ke2,
            ClientLoginFinishParameters::new(None, Default::default(), Some(&ksf)),
        );
        assert!(client.is_err(), "a wrong password never opens the envelope");
        // A forged KE3 is answered exactly like a wrong one.
        let finish = c
            .raw()
            .recover_finish(pb::RecoverFinishRequest {
                login_id: challenge.login_id.clone(),
                ke3: vec![0x5a; 32],
            })
            .await
            .expect("finish")
            .into_inner();
        answers.push((challenge.ke2.len(), challenge.login_id.len(), finish));
    }
    assert_eq!(
        answers[0], answers[1],
        "a stranger must not tell real from unknown accounts"
    );
    // And the unknown account counts down and locks like a real one: nine
    // more wrong guesses, the last of them answered `locked`.
    let mut seen = HashSet::new();
    for _ in 0..9 {
        match c.recover_key(b"nobody-at-all", b"guess").await {
            Err(ClientError::WrongPassword) => {
                seen.insert("wrong");
            }
            Err(ClientError::Locked) => {
                seen.insert("locked");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen.contains("locked"), "{seen:?}");
    assert!(matches!(
        c.recover_key(b"nobody-at-all", b"guess").await,
        Err(ClientError::Locked)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant2_fifty_concurrent_wrong_recoveries_release_at_most_ten_ke2() {
    // The attempt limit alone, without the rate limit in front of it.
    let (node, key) =
        registered_with("race", "erin", vec!["--recovery-limit-account=off".into()]).await;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = node.client().await;
        tasks.push(tokio::spawn(async move {
            let login = ClientLogin::<Suite>::start(&mut OsRng, b"wrong").expect("start");
            let answer = c
                .raw()
                .recover_start(pb::RecoverStartRequest {
                    account_id: b"erin".to_vec(),
                    ke1: login.message.serialize().to_vec(),
                })
                .await
                .expect("recover start")
                .into_inner();
            matches!(
                answer.outcome,
                Some(pb::recover_start_response::Outcome::Challenge(_))
            )
        }));
    }
    let mut released = 0;
    for t in tasks {
        if t.await.expect("task") {
            released += 1;
        }
    }
    assert!(
        start.elapsed() < std::time::Duration::from_secs(120),
        "bounded run"
    );
    assert!(
        released <= 10,
        "{released} KE2 released for a 10-guess record"
    );
    assert_eq!(released, 10, "the first ten guesses are honoured");
    let mut c = node.client().await;
    assert!(matches!(
        c.recover_key(b"erin", PASSWORD).await,
        Err(ClientError::Locked)
    ));
    drop(key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_client_refuses_a_vault_with_another_key() {
    let (a, _key) = registered("pin-a", "frank").await;
    let b = VaultNode::start("pin-b");
    assert_ne!(
        a.pinned_key(),
        b.pinned_key(),
        "each token has its own OPAQUE key"
    );
    let refused =
        vault_client::VaultClient::connect(&b.endpoint(), &b.transport(), a.pinned_key()).await;
    assert!(
        matches!(refused, Err(ClientError::KeyMismatch)),
        "{refused:?}"
    );
    // The CLI says so and refuses to register or recover.
    std::fs::write(b.work.path().join("token"), b.bearer("frank")).expect("token file");
    for args in [
        vec!["key", "register", "--generate"],
        vec!["key", "recover"],
    ] {
        let out = b
            .cli()
            .env("VAULT_PUBLIC_KEY", a.public_key_path())
            .env("VAULT_TOKEN_FILE", b.work.path().join("token"))
            .args(&args)
            .args(["--account", "frank", "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("stdin").write_all(b"pw\n")?;
                child.wait_with_output()
            })
            .expect("run vault");
        assert_eq!(
            out.status.code(),
            Some(6),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does not match the pinned key"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant9_register_or_delete_without_valid_token_is_unauthenticated() {
    let (node, key) = registered("auth", "grace").await;
    let mut c = node.client().await;
    let other = VaultNode::start("auth-other");
    let bad_tokens = [
        String::new(),
        "garbage".to_owned(),
        node.bearer("mallory"),               // another account
        node.bearer_expiring("grace", -3600), // expired
        other.bearer("grace"),                // signed by an untrusted identity key
    ];
    for token in &bad_tokens {
        let r = c.register_key(b"grace", token, b"pw", &key, 0).await;
        assert!(
            matches!(r, Err(ClientError::Unauthenticated(_))),
            "register with {token:?}: {r:?}"
        );
        let r = c.delete(b"grace", token, PASSWORD).await;
        assert!(
            matches!(r, Err(ClientError::Unauthenticated(_))),
            "delete with {token:?}: {r:?}"
        );
        let r = c.status(b"grace", token).await;
        assert!(
            matches!(r, Err(ClientError::Unauthenticated(_))),
            "status with {token:?}: {r:?}"
        );
    }
    // No header at all.
    let status = c
        .raw()
        .register_start(pb::RegisterStartRequest {
            account_id: b"grace".to_vec(),
            registration_request: vec![1; 65],
        })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // The record is untouched, and the owner can delete it.
    assert_eq!(
        c.recover_key(b"grace", PASSWORD).await.expect("recover").0,
        key.0
    );
    c.delete(b"grace", &node.bearer("grace"), PASSWORD)
        .await
        .expect("delete");
    assert_eq!(
        c.status(b"grace", &node.bearer("grace"))
            .await
            .expect("status"),
        RecordStatus::NotRegistered
    );
}

/// RegisterStart evaluates the OPRF under a fresh per-registration key, so
/// whoever may register (holds an owner token, or can mint one) cannot use it
/// as an unmetered password-guessing oracle against the stored record: the
/// same blinded element gets a different evaluation from RegisterStart each
/// time, and never the one a (charged) login gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant2_register_start_is_not_an_oprf_oracle_for_logins() {
    let (node, _key) = registered("oracle", "heidi").await;
    let mut c = node.client().await;
    let blinded = opaque_ke::ClientRegistration::<Suite>::start(&mut OsRng, b"guess")
        .expect("start")
        .message
        .serialize()
        .to_vec();
    let mut register_evaluations = HashSet::new();
    for _ in 0..3 {
        let mut req = tonic::Request::new(pb::RegisterStartRequest {
            account_id: b"heidi".to_vec(),
            registration_request: blinded.clone(),
        });
        let bearer = format!("Bearer {}", node.bearer("heidi"));
        req.metadata_mut()
            .insert("authorization", bearer.parse().expect("header"));
        let answer = c
            .raw()
            .register_start(req)
            .await
            .expect("register start")
            .into_inner();
        assert_eq!(answer.registration_id.len(), 16);
        register_evaluations.insert(answer.registration_response[..33].to_vec());
    }
    assert_eq!(
        register_evaluations.len(),
        3,
        "a fresh OPRF key per registration"
    );

    // A login with the same blinded element (KE1 = blinded || nonce || epk).
    let mut ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"guess")
        .expect("login")
        .message
        .serialize()
        .to_vec();
    ke1[..33].copy_from_slice(&blinded);
    let answer = c
        .raw()
        .recover_start(pb::RecoverStartRequest {
            account_id: b"heidi".to_vec(),
            ke1,
        })
        .await
        .expect("recover start")
        .into_inner();
    let Some(pb::recover_start_response::Outcome::Challenge(ch)) = answer.outcome else {
        panic!("expected a challenge");
    };
    assert!(
        !register_evaluations.contains(&ch.ke2[..33]),
        "login OPRF key leaked through RegisterStart"
    );
}

/// What a stranger can compare of a RecoverStart answer: everything but
/// the random bytes of the KE2 and the login id, which keep their lengths.
fn start_shape(answer: &pb::RecoverStartResponse) -> Vec<u8> {
    use prost::Message;
    let mut a = answer.clone();
    if let Some(pb::recover_start_response::Outcome::Challenge(c)) = &mut a.outcome {
        c.ke2.iter_mut().for_each(|b| *b = 0);
        c.login_id.iter_mut().for_each(|b| *b = 0);
    }
    a.encode_to_vec()
}

/// Invariant 5 and issue 16: a stranger cannot tell a real account — one
/// registered with a limit of 3, or one whose owner just recovered — from
/// an unknown one by any field of any answer: guess after guess, through
/// and past every limit, the answers are the same byte for byte (but for
/// the random bytes of KE2 and login id, whose lengths are compared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant5_a_stranger_cannot_tell_a_low_limit_or_just_recovered_account_from_an_unknown_one(
) {
    let (node, key) = registered("shapes", "recovered").await;
    let mut c = node.client().await;
    // The owner of "recovered" got a guess wrong, then recovered (reset).
    assert!(matches!(
        c.recover_key(b"recovered", b"typo").await,
        Err(ClientError::WrongPassword)
    ));
    assert_eq!(
        c.recover_key(b"recovered", PASSWORD)
            .await
            .expect("recover")
            .0,
        key.0
    );
    let three = BackupKey::generate();
    c.register_key(b"three", &node.bearer("three"), PASSWORD, &three, 3)
        .await
        .expect("register with 3 guesses");

    let accounts = ["nobody-at-all", "three", "recovered"];
    let mut transcripts: Vec<Vec<Vec<u8>>> = vec![Vec::new(); accounts.len()];
    for round in 1..=11 {
        for (i, account) in accounts.iter().enumerate() {
            let (answer, _) = start_answer(&mut c, account, b"a stranger's guess").await;
            transcripts[i].push(start_shape(&answer));
            if let Some(pb::recover_start_response::Outcome::Challenge(ch)) = answer.outcome {
                // The guess is wrong: the client gives up (empty KE3).
                let finish = c
                    .raw()
                    .recover_finish(pb::RecoverFinishRequest {
                        login_id: ch.login_id,
                        ke3: Vec::new(),
                    })
                    .await
                    .expect("finish")
                    .into_inner();
                use prost::Message;
                transcripts[i].push(finish.encode_to_vec());
            }
        }
        for (i, account) in accounts.iter().enumerate().skip(1) {
            assert_eq!(
                transcripts[i], transcripts[0],
                "round {round}: {account} answers unlike an unknown account"
            );
        }
    }
    // They all locked at the same guess (the tenth), and the owner's view
    // (Status, with the token) still tells the truth: the low-limit record
    // was destroyed at its own third guess.
    assert!(transcripts[0].last().is_some_and(|last| last
        == &start_shape(&pb::RecoverStartResponse {
            outcome: Some(pb::recover_start_response::Outcome::Locked(pb::Locked {})),
        })));
    assert_eq!(
        c.status(b"three", &node.bearer("three"))
            .await
            .expect("status"),
        RecordStatus::Locked
    );
}

/// PyJWT (an independent JWT library), under `target/tools/pyjwt`
/// (`scripts/ensure-deps.sh` installs it); `VAULT_PYJWT_PYTHON` overrides.
fn pyjwt_python() -> std::path::PathBuf {
    vault_e2e::tool("pyjwt/bin/python", "VAULT_PYJWT_PYTHON")
}

/// Mints owner tokens with PyJWT from the node's identity key (a private
/// JWK on standard input), one per line: a good one, then one each for
/// another audience, from an unknown key, with `alg: none`, HS256 keyed
/// with the public JWK, and living two hours.
const MINT: &str = r#"
import base64, hashlib, hmac, json, sys, time
import jwt
from jwt.algorithms import ECAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
jwk = json.loads(sys.stdin.read())
key = ECAlgorithm.from_jwk(json.dumps(jwk))
kid = jwk["kid"]
public = {k: jwk[k] for k in ("kty", "crv", "x", "y", "kid")}
now = int(time.time())
def claims(**over):
    c = {"sub": "py-owner", "aud": "hsm-vault", "iss": "hsm-vault-local-identity",
         "iat": now, "exp": now + 600}
    c.update(over)
    return c
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
out = [
    jwt.encode(claims(), key, algorithm="ES256", headers={"kid": kid}),
    jwt.encode(claims(aud="another-vault"), key, algorithm="ES256", headers={"kid": kid}),
    jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
               headers={"kid": kid}),
    jwt.encode(claims(), None, algorithm="none"),
]
head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
body = b64(json.dumps(claims()).encode())
mac = hmac.new(json.dumps(public).encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
out.append(f"{head}.{body}.{b64(mac)}")
out.append(jwt.encode(claims(exp=now + 7200), key, algorithm="ES256", headers={"kid": kid}))
print("\n".join(out))
"#;

/// Issue 16: owner tokens are standard JWTs. One minted by PyJWT with the
/// identity service's key is accepted; one for another audience, from an
/// unknown key, with `alg: none`, HS256 keyed with the public key, or
/// living longer than the node allows is refused (UNAUTHENTICATED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant9_owner_tokens_are_es256_jwts_and_one_from_pyjwt_is_accepted() {
    let node = VaultNode::start("jwt");
    let mut mint = std::process::Command::new(pyjwt_python())
        .args(["-c", MINT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write;
        let jwk = node.issuer().private_jwk();
        mint.stdin
            .take()
            .expect("stdin")
            .write_all(jwk.as_bytes())
            .expect("write the key");
    }
    let out = mint.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Vec<String> = String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(tokens.len(), 6, "{tokens:?}");
    let mut c = node.client().await;
    let status = |token: &str| {
        let mut request = tonic::Request::new(pb::StatusRequest {
            account_id: b"py-owner".to_vec(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        request
    };
    c.raw()
        .status(status(&tokens[0]))
        .await
        .expect("PyJWT's ES256 token is accepted");
    for (what, token) in [
        "another audience",
        "an unknown key",
        "alg none",
        "HS256 keyed with the public key",
        "a lifetime of two hours",
    ]
    .iter()
    .zip(&tokens[1..])
    {
        let refused = c.raw().status(status(token)).await.expect_err(what);
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{what}: {refused:?}"
        );
    }
}
