//! Rate limits on recovery starts: a burst on one account is throttled
//! (RESOURCE_EXHAUSTED with a retry hint) while other accounts are served;
//! one client address is limited across accounts.

use opaque_ke::ClientLogin;
use rand::rngs::OsRng;
use tonic::Code;
use vault_client::BackupKey;
use vault_e2e::VaultNode;
use vault_proto::suite::Suite;
use vault_proto::vault::v1 as pb;
use zeroize::Zeroizing;

fn start_request(account: &str) -> pb::RecoverStartRequest {
    let login = ClientLogin::<Suite>::start(&mut OsRng, b"any password").expect("KE1");
    pb::RecoverStartRequest {
        account_id: account.as_bytes().to_vec(),
        ke1: login.message.serialize().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_a_burst_of_1000_starts_on_one_account_is_throttled_while_others_are_served() {
    // The defaults: 20 at once, then 10 a minute, per account.
    let node = VaultNode::start("limits-account");
    let mut c = node.client().await;
    let others: Vec<String> = (0..5)
        .map(|i| format!("bystander-{i}@example.org"))
        .collect();
    for (i, a) in others.iter().enumerate() {
        let key = BackupKey(Zeroizing::new([i as u8; 32]));
        c.register_key(a.as_bytes(), &node.bearer(a), b"their password", &key, 10)
            .await
            .expect("register");
    }

    // 1,000 starts on the victim's account, 25 at a time, while the
    // bystanders recover their keys.
    let victim = "victim@example.org";
    let mut throttled = 0;
    let mut answered = 0;
    let mut hints = Vec::new();
    for round in 0..40 {
        let mut calls = Vec::new();
        for _ in 0..25 {
            let mut raw = c.raw().clone();
            calls.push(tokio::spawn(async move {
                raw.recover_start(start_request(victim)).await
            }));
        }
        let bystander = &others[round % others.len()];
        let key = c
            .recover_key(bystander.as_bytes(), b"their password")
            .await
            .expect("a bystander is served during the burst");
        assert_eq!(*key.0, [(round % others.len()) as u8; 32]);
        for call in calls {
            match call.await.expect("task") {
                Ok(_) => answered += 1,
                Err(s) if s.code() == Code::ResourceExhausted => {
                    throttled += 1;
                    let secs: u64 = s
                        .metadata()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .expect("a retry-after hint in seconds");
                    assert!(s.message().contains("retry in"), "{}", s.message());
                    hints.push(secs);
                }
                Err(s) => panic!("unexpected answer: {s:?}"),
            }
        }
    }
    assert_eq!(answered + throttled, 1000);
    // The burst of 20, plus what refilled (10 a minute) while it ran.
    assert!(answered >= 20, "only {answered} answered");
    assert!(answered <= 40, "{answered} starts got through");
    assert!(hints.iter().all(|s| (1..=6).contains(s)), "{hints:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_one_client_address_is_throttled_across_accounts() {
    let mut node = VaultNode::unstarted(
        "limits-address",
        vec![
            "--recovery-limit-address=30/60".into(),
            "--recovery-limit-account=off".into(),
        ],
    );
    node.restart();
    let mut c = node.client().await;
    let mut answered = 0;
    let mut throttled = 0;
    for i in 0..100 {
        match c
            .raw()
            .recover_start(start_request(&format!("account-{i}")))
            .await
        {
            Ok(_) => answered += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("address"), "{}", s.message());
                throttled += 1;
            }
            Err(s) => panic!("unexpected answer: {s:?}"),
        }
    }
    assert!((30..=35).contains(&answered), "{answered} answered");
    assert_eq!(answered + throttled, 100);
}
