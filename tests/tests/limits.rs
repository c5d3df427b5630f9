//! Rate limits on recovery starts: a burst on one account is throttled
//! (RESOURCE_EXHAUSTED with a retry hint) while other accounts are served;
//! one client address is limited across accounts, behind a PROXY-protocol
//! load balancer too, and on the node serving the record whichever node
//! the client came through.

use std::net::SocketAddr;

use opaque_ke::ClientLogin;
use rand::rngs::OsRng;
use tonic::transport::Channel;
use tonic::Code;
use vault_client::BackupKey;
use vault_e2e::{proxied_channel, VaultNode};
use vault_proto::suite::Suite;
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_client::VaultClient;
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

/// The client API's address, from a node's endpoint URL.
fn client_addr(node: &VaultNode) -> SocketAddr {
    node.endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("plaintext endpoint")
}

/// Recovery starts through `channel` on fresh accounts: how many were
/// answered before the first refusal, which must be the address limit.
async fn starts_until_throttled(channel: &Channel, tries: usize) -> usize {
    let mut raw = VaultClient::new(channel.clone());
    for i in 0..tries {
        let account = format!("stranger-{}", hex::encode(rand::random::<[u8; 8]>()));
        match raw.recover_start(start_request(&account)).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("address"), "{}", s.message());
                return i;
            }
            Err(s) => panic!("unexpected answer: {s:?}"),
        }
    }
    tries
}

const PROXY_LIMITS: [&str; 3] = [
    "--proxy-protocol",
    "--recovery-limit-address=5/1",
    "--recovery-limit-account=off",
];

/// Behind a load balancer sending PROXY protocol headers, each client
/// address the balancer names has its own bucket (not one for the
/// balancer), and a connection without a header is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_behind_a_proxy_protocol_sender_each_client_address_has_its_own_bucket() {
    let mut node = VaultNode::unstarted(
        "limits-proxy",
        PROXY_LIMITS.iter().map(|a| (*a).to_owned()).collect(),
    );
    node.start_process()
        .expect("the node takes --proxy-protocol");
    let addr = client_addr(&node);
    let alice = proxied_channel(addr, "198.51.100.1:40000".parse().expect("addr"))
        .await
        .expect("connect");
    let bob = proxied_channel(addr, "198.51.100.2:40000".parse().expect("addr"))
        .await
        .expect("connect");
    assert_eq!(starts_until_throttled(&alice, 20).await, 5);
    // Both come from 127.0.0.1: without the header they would share a
    // bucket, and bob would be refused now.
    assert_eq!(starts_until_throttled(&bob, 20).await, 5);
    // Another host of bob's IPv6 /64 shares a bucket; another /64 does not.
    let v6 = |a: &str| a.parse::<SocketAddr>().expect("addr");
    let host1 = proxied_channel(addr, v6("[2001:db8:7:7::1]:1"))
        .await
        .expect("connect");
    let host2 = proxied_channel(addr, v6("[2001:db8:7:7::2]:1"))
        .await
        .expect("connect");
    let other = proxied_channel(addr, v6("[2001:db8:7:8::1]:1"))
        .await
        .expect("connect");
    assert_eq!(starts_until_throttled(&host1, 3).await, 3);
    assert_eq!(starts_until_throttled(&host2, 20).await, 2);
    assert_eq!(starts_until_throttled(&other, 20).await, 5);
    // A client that skips the balancer (no header) is not served.
    let mut direct = VaultClient::new(
        tonic::transport::Endpoint::from_shared(node.endpoint())
            .expect("endpoint")
            .timeout(std::time::Duration::from_secs(10))
            .connect_lazy(),
    );
    direct
        .recover_start(start_request("someone"))
        .await
        .expect_err("a connection without a PROXY header is dropped");
}

/// In a replica group, a client's starts count against its address on the
/// node serving the record (the leader) too, whichever node they entered
/// through: going through another node does not give a fresh budget, while
/// another client is still served through the same node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_a_forwarded_start_is_limited_by_its_client_address_on_the_serving_node() {
    let mut nodes = vault_e2e::prepare_fleet(&[3], "limits-fwd");
    for node in &mut nodes {
        node.extra_args
            .extend(PROXY_LIMITS.iter().map(|a| (*a).to_owned()));
        node.restart();
    }
    let carol: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
    let dave: SocketAddr = "203.0.113.10:5000".parse().expect("addr");
    // The leader, asked through a balancer address of its own.
    let probe: SocketAddr = "192.0.2.200:1".parse().expect("addr");
    let leader = loop {
        let mut leaders = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let channel = proxied_channel(client_addr(node), probe)
                .await
                .expect("connect");
            let info = VaultClient::new(channel)
                .get_info(pb::GetInfoRequest {})
                .await
                .expect("info")
                .into_inner();
            if info.leader_id != 0 && info.leader_id == info.node_id {
                leaders.push(i);
            }
        }
        if let [one] = leaders[..] {
            break one;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let through = |i: usize, client: SocketAddr| {
        let addr = client_addr(&nodes[i]);
        async move { proxied_channel(addr, client).await.expect("connect") }
    };
    // Carol spends her budget through the first follower...
    assert_eq!(
        starts_until_throttled(&through(followers[0], carol).await, 20).await,
        5
    );
    // ...and the second follower, with a full bucket of its own for her,
    // forwards her starts to the leader, which refuses them.
    assert_eq!(
        starts_until_throttled(&through(followers[1], carol).await, 20).await,
        0
    );
    // Dave, through the same follower, is served.
    assert_eq!(
        starts_until_throttled(&through(followers[1], dave).await, 3).await,
        3
    );
}

/// One client address cannot hold more than its quota of pending logins
/// (started, never finished): past it, its starts are refused before any
/// charge, while another address still gets its KE2s. Address limits are
/// off here, so only the quota stands in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_one_address_cannot_hold_more_than_its_quota_of_pending_logins() {
    let mut node = VaultNode::unstarted(
        "limits-pending",
        vec![
            "--proxy-protocol".into(),
            "--recovery-limit-address=off".into(),
            "--recovery-limit-account=off".into(),
        ],
    );
    node.start_process().expect("start");
    let addr = client_addr(&node);
    let hog = proxied_channel(addr, "198.51.100.66:1".parse().expect("addr"))
        .await
        .expect("connect");
    let quota = hsm_vault::core::pending::MAX_PENDING_PER_CLIENT;
    let mut answered = 0;
    for _ in 0..quota / 16 {
        let mut calls = Vec::new();
        for _ in 0..16 {
            let mut raw = VaultClient::new(hog.clone());
            let account = format!("nobody-{}", hex::encode(rand::random::<[u8; 8]>()));
            calls.push(tokio::spawn(async move {
                raw.recover_start(start_request(&account)).await
            }));
        }
        for call in calls {
            call.await.expect("task").expect("within the quota");
            answered += 1;
        }
    }
    assert_eq!(answered, quota);
    let refused = VaultClient::new(hog.clone())
        .recover_start(start_request("one-more"))
        .await
        .expect_err("past the quota");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let other = proxied_channel(addr, "198.51.100.67:1".parse().expect("addr"))
        .await
        .expect("connect");
    for i in 0..3 {
        VaultClient::new(other.clone())
            .recover_start(start_request(&format!("someone-{i}")))
            .await
            .expect("another address still gets KE2s");
    }
}
