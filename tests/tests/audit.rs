//! The audit trail: every security event of a scripted session is recorded
//! and chained in the token; `vault-audit` verifies and exports it, refuses
//! a changed or shortened trail, and a byte search finds neither a secret
//! nor the account id in it.

use std::path::Path;
use std::process::{Command, Output};

use vault_client::{BackupKey, ClientError};
use vault_e2e::{bin, contains, VaultNode};
use zeroize::Zeroizing;

const ACCOUNT: &str = "audited-owner@example.org";
const PASSWORD: &[u8] = b"audit-Pa55word-never-in-the-trail";
const KEY: [u8; 32] = *b"AUDIT-KEY-MARKER-0123456789abcde";

fn vault_audit(node: &VaultNode, log: &Path) -> Output {
    Command::new(bin("vault-audit"))
        .envs(node.token.env())
        .arg("--log")
        .arg(log)
        .args(["--token-label", &node.label])
        .arg("--pin-file")
        .arg(node.pin_file())
        .output()
        .expect("vault-audit runs")
}

fn event_names(export: &str) -> Vec<String> {
    export
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["event"].as_str().expect("an event name").to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_records_every_event_of_a_session_without_secrets_or_account_ids() {
    let mut node = VaultNode::start("audit");
    let mut c = node.client().await;
    let token = node.bearer(ACCOUNT);
    let account = ACCOUNT.as_bytes();
    let key = BackupKey(Zeroizing::new(KEY));

    // The script: register (2 guesses), a wrong guess, the right one, two
    // wrong ones (the second destroys the key), register again, delete.
    c.register_key(account, &token, PASSWORD, &key, 2)
        .await
        .expect("register");
    let e = c.recover_key(account, b"wrong").await.expect_err("wrong");
    assert!(matches!(e, ClientError::WrongPassword), "{e}");
    let got = c.recover_key(account, PASSWORD).await.expect("recover");
    assert_eq!(*got.0, KEY);
    let e = c.recover_key(account, b"wrong").await.expect_err("wrong");
    assert!(matches!(e, ClientError::WrongPassword), "{e}");
    // The second wrong guess reaches the record's own limit: its secret is
    // destroyed, and the answer is the one any record gives a stranger
    // (only the owner's Status shows it).
    let e = c
        .recover_key(account, b"wrong")
        .await
        .expect_err("destroys");
    assert!(matches!(e, ClientError::WrongPassword), "{e}");
    assert_eq!(
        c.status(account, &token).await.expect("status"),
        vault_client::RecordStatus::Locked
    );
    c.register_key(account, &token, PASSWORD, &key, 5)
        .await
        .expect("register again");
    c.delete(account, &token, PASSWORD).await.expect("delete");

    let log = node.data_dir().join("audit.log");
    let out = vault_audit(&node, &log);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(
        event_names(&export),
        [
            "registered",
            "guess_charged",
            "wrong_password",
            "guess_charged",
            "recovered",
            "guess_charged",
            "wrong_password",
            "guess_charged",
            "locked",
            "registered",
            "guess_charged",
            "deleted",
        ],
        "{export}"
    );
    // Every event names the record by the vault's pseudonym (its token
    // HMAC, read here with the node stopped).
    node.kill9();
    let record = hex::encode(node.inspector().record_id(ACCOUNT).0);
    for line in export.lines() {
        assert!(line.contains(&record), "{line}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("chain verified through entry 12"));

    // Byte search of the trail and of its export.
    let raw = std::fs::read(&log).expect("trail");
    for (what, needle) in [
        ("account id", ACCOUNT.as_bytes().to_vec()),
        ("password", PASSWORD.to_vec()),
        ("backup key", KEY.to_vec()),
        ("backup key (hex)", hex::encode(KEY).into_bytes()),
    ] {
        assert!(!contains(&raw, &needle), "the trail holds the {what}");
        assert!(
            !contains(export.as_bytes(), &needle),
            "the export holds the {what}"
        );
    }

    // A changed entry, and a removed one, are refused.
    let text = String::from_utf8(raw).expect("utf8");
    let changed = node.work.path().join("changed.log");
    std::fs::write(
        &changed,
        text.replacen("\"guesses_remaining\":1", "\"guesses_remaining\":2", 1),
    )
    .expect("write");
    let out = vault_audit(&node, &changed);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not verify"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shortened = node.work.path().join("shortened.log");
    let lines: Vec<&str> = text.lines().collect();
    let without_second = [&lines[..1], &lines[2..]].concat().join("\n") + "\n";
    std::fs::write(&shortened, without_second).expect("write");
    let out = vault_audit(&node, &shortened);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing or reordered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
