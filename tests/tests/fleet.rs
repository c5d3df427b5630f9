//! The `fleet` operator tool end to end: `fleet up` builds a 5-node fleet in
//! 3 regions (tokens, ceremony, certificates, processes), `status` reports
//! it, and the fleet serves backups through any node while its leader is
//! down. A fleet runs over TLS: clients use `https://` and the fleet CA,
//! nodes talk to each other and the tool to the nodes over mutual TLS.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vault_e2e::{bin, free_ports};

const DEADLINE: Duration = Duration::from_secs(30);

fn fleet(dir: &std::path::Path, args: &[&str]) -> Output {
    vault_e2e::fleet_tool(dir, args)
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn leader(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let cols: Vec<_> = l.split_whitespace().collect();
        (cols.get(5) == Some(&"leader"))
            .then(|| cols[0].parse().ok())
            .flatten()
    })
}

/// A learner's catch-up is reported (at once, then every second) before
/// the leader confirms it: "node N catching up: applied X of Y entries".
fn assert_catch_up_reported(out: &str, id: u64) {
    let prefix = format!("node {id} catching up: applied ");
    let line = out
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no catch-up progress for node {id}: {out}"));
    let words: Vec<&str> = line[prefix.len()..].split_whitespace().collect();
    let target: u64 = words[2].parse().expect("leader's applied index");
    assert!(words[1] == "of" && target > 0, "{line}");
    let confirmed = format!("node {id}: added as a learner (caught up)");
    assert!(out.find(line) < out.find(&confirmed), "{out}");
}

fn vault(dir: &std::path::Path, endpoint: &str, args: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new(bin("vault"));
    cmd.env("VAULT_ENDPOINT", endpoint)
        .env("VAULT_PUBLIC_KEY", dir.join("vault.pub"))
        .env("VAULT_CA_CERT", dir.join("tls/ca.pem"))
        .args(args);
    vault_e2e::run_with_stdin(cmd, stdin)
}

/// Issues an owner token for `account` with the fleet's identity key and
/// registers a generated raw key through `endpoint`; returns the key (the
/// CLI's output).
fn register_key(dir: &Path, work: &Path, endpoint: &str, account: &str) -> Vec<u8> {
    let issued = Command::new(bin("vault"))
        .args(["token", "issue", "--account", account, "--signing-key"])
        .arg(dir.join("identity/identity.key"))
        .output()
        .expect("issue");
    let token = work.join(format!("{account}.token"));
    std::fs::write(&token, &issued.stdout).expect("token");
    let registered = vault(
        dir,
        endpoint,
        &[
            "key",
            "register",
            "--generate",
            "--account",
            account,
            "--password-stdin",
            "--token-file",
            token.to_str().expect("utf8"),
        ],
        "pw\n",
    );
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    registered.stdout
}

/// Recovers `account`'s raw key through `endpoint` with `password`.
fn recover_key(dir: &Path, endpoint: &str, account: &str, password: &str) -> Output {
    vault(
        dir,
        endpoint,
        &["key", "recover", "--account", account, "--password-stdin"],
        &format!("{password}\n"),
    )
}

/// The regions of the usual 5-node test fleet (one replica group).
const FIVE_NODES: [&str; 5] = ["eu", "eu", "us", "us", "ap"];

/// A fleet `fleet up` runs in `work/fleet`, from a fleet file made by
/// [`fleet_file_with`].
struct UpFleet {
    dir: std::path::PathBuf,
    file: std::path::PathBuf,
    /// The client API ports, node 1 first.
    ports: Vec<u16>,
    /// What `fleet up` printed.
    up: String,
    /// Stops the fleet when dropped.
    _down: vault_e2e::FleetDown,
}

fn up_fleet(work: &Path, regions: &[&str], groups: &[u64]) -> UpFleet {
    let dir = work.join("fleet");
    let (file, ports) = fleet_file_with(work, regions, groups);
    let _down = vault_e2e::FleetDown(dir.clone());
    let up = ok(fleet(
        &dir,
        &["up", "--fleet-file", file.to_str().expect("utf8")],
    ));
    UpFleet {
        dir,
        file,
        ports,
        up,
        _down,
    }
}

/// Writes a fleet file: node i+1 in `regions[i]` and group `groups[i]`.
/// Returns it and the client API ports; each node's peer listener is on
/// another free port.
fn fleet_file_with(
    work: &std::path::Path,
    regions: &[&str],
    groups: &[u64],
) -> (std::path::PathBuf, Vec<u16>) {
    let mut ports = free_ports(2 * regions.len());
    let peer_ports = ports.split_off(regions.len());
    let mut file = String::from(
        "[fleet]\nname = \"t\"\nintra_region_ms = 1\n[[region]]\nname = \"eu\"\n[[region]]\nname = \"us\"\n\
         [[region]]\nname = \"ap\"\n[[link]]\nbetween = [\"eu\", \"us\"]\nms = 10\n\
         [[link]]\nbetween = [\"eu\", \"ap\"]\nms = 20\n[[link]]\nbetween = [\"us\", \"ap\"]\nms = 20\n",
    );
    for (i, (p, peer)) in ports.iter().zip(&peer_ports).enumerate() {
        file.push_str(&format!(
            "[[node]]\nid = {}\nregion = \"{}\"\naddr = \"127.0.0.1:{p}\"\n\
             peer_addr = \"127.0.0.1:{peer}\"\ngroup = {}\n",
            i + 1,
            regions[i],
            groups[i]
        ));
    }
    let path = work.join("fleet.toml");
    std::fs::write(&path, file).expect("fleet file");
    (path, ports)
}

/// Every process command line on the machine now (`/proc/*/cmdline`).
fn command_lines() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .collect()
}

/// No PIN is ever on a command line, where every user of the machine can
/// read it: `/proc/*/cmdline` is scanned without pause while `fleet up`
/// makes the tokens and starts the nodes, and no PIN the fleet wrote shows
/// up in any of them. And no serving node keeps an SO PIN: they are with
/// the operator (`operator/so-pins/`), in no node's directory and named by
/// no node's command line. (`fleet replace-node`, whose ceremony needs the
/// source's SO PIN, is run in
/// `fleet_replace_add_remove_and_drain_keep_every_record_recoverable`.)
#[test]
fn fleet_up_puts_no_pin_on_any_command_line_and_no_so_pin_on_a_node() {
    let work = tempfile::tempdir().expect("dir");
    let dir = work.path().join("fleet");
    let (file, _) = fleet_file_with(work.path(), &["eu", "us", "ap"], &[1, 1, 1]);
    let _down = vault_e2e::FleetDown(dir.clone());
    let mut up = Command::new(bin("fleet"))
        .arg("--dir")
        .arg(&dir)
        .args(["up", "--fleet-file", file.to_str().expect("utf8")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleet up");
    let mut seen = std::collections::BTreeSet::new();
    let start = Instant::now();
    let status = loop {
        seen.extend(command_lines());
        if let Some(status) = up.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < DEADLINE * 4, "fleet up did not end");
    };
    assert!(status.success(), "fleet up failed");
    let pins: Vec<String> = vault_e2e::files_under(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pin"))
        .map(|p| std::fs::read_to_string(p).expect("pin").trim().to_owned())
        .collect();
    assert!(pins.len() >= 3, "the fleet's PIN files: {pins:?}");
    assert!(seen.len() > 1, "no command lines were read");
    for pin in &pins {
        assert!(!pin.is_empty());
        if let Some(line) = seen.iter().find(|l| l.contains(pin.as_str())) {
            panic!("a PIN on a command line: {line}");
        }
    }

    let so_pins: Vec<String> = (1..=3)
        .map(|id| {
            std::fs::read_to_string(dir.join(format!("operator/so-pins/node-{id}.pin")))
                .expect("the operator keeps each SO PIN")
                .trim()
                .to_owned()
        })
        .collect();
    for id in 1..=3 {
        for file in vault_e2e::files_under(&dir.join(format!("node-{id}"))) {
            let bytes = std::fs::read(&file).expect("read");
            for so_pin in &so_pins {
                assert!(
                    !vault_e2e::contains(&bytes, so_pin.as_bytes()),
                    "an SO PIN on node {id}'s disk: {}",
                    file.display()
                );
            }
        }
    }
    for line in command_lines().iter().filter(|l| l.contains("hsm-vault")) {
        assert!(!line.contains("so-pin"), "a node told of an SO PIN: {line}");
    }
}

#[test]
fn fleet_up_runs_five_nodes_in_three_regions_that_serve_backups_through_a_leader_crash() {
    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        ports,
        up,
        _down,
        ..
    } = up_fleet(work.path(), &FIVE_NODES, &[1; 5]);
    // The domain keys reach the other four tokens by the ceremony, or where
    // the tokens cannot clone, by import into all five.
    if softhsm_test_harness::provider().can_clone() {
        assert_eq!(up.matches("domain keys cloned").count(), 4, "{up}");
    } else {
        assert_eq!(up.matches("domain keys imported").count(), 5, "{up}");
    }
    assert_eq!(up.matches("listening on").count(), 5, "{up}");

    let start = Instant::now();
    let leader_id = loop {
        let status = ok(fleet(&dir, &["status"]));
        if let Some(l) = leader(&status) {
            assert_eq!(status.matches(" up ").count(), 5, "{status}");
            for r in ["eu", "us", "ap"] {
                assert!(status.contains(r), "{status}");
            }
            break l;
        }
        assert!(start.elapsed() < DEADLINE, "no leader: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };

    let token = work.path().join("token");
    let issued = Command::new(bin("vault"))
        .args(["token", "issue", "--account", "zoe", "--signing-key"])
        .arg(dir.join("identity/identity.key"))
        .output()
        .expect("issue");
    std::fs::write(&token, &issued.stdout).expect("token");
    let input = work.path().join("in.db");
    std::fs::write(&input, vec![42u8; 300_000]).expect("input");
    let enc = work.path().join("in.enc");
    let endpoint = |id: u64| format!("https://127.0.0.1:{}", ports[id as usize - 1]);
    let create = vault(
        &dir,
        &endpoint(5),
        &[
            "backup",
            "create",
            "--account",
            "zoe",
            "--password-stdin",
            "--token-file",
            token.to_str().expect("utf8"),
            "--in",
            input.to_str().expect("utf8"),
            "--out",
            enc.to_str().expect("utf8"),
        ],
        "pw\n",
    );
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );

    ok(fleet(
        &dir,
        &["stop-node", "--id", &leader_id.to_string(), "--kill"],
    ));
    let other = leader_id % 5 + 1;
    let out = work.path().join("out.db");
    let start = Instant::now();
    loop {
        let restore = vault(
            &dir,
            &endpoint(other),
            &[
                "backup",
                "restore",
                "--account",
                "zoe",
                "--password-stdin",
                "--in",
                enc.to_str().expect("utf8"),
                "--out",
                out.to_str().expect("utf8"),
            ],
            "pw\n",
        );
        if restore.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&restore.stderr).into_owned();
        assert!(
            err.contains("Unavailable") && start.elapsed() < DEADLINE,
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        std::fs::read(&out).expect("out"),
        std::fs::read(&input).expect("in")
    );
    let status = ok(fleet(&dir, &["status"]));
    assert!(status.contains("DOWN"), "{status}");
}

/// Waits for a leader and for every listed node to be up with no lag.
fn settled(dir: &std::path::Path, nodes: usize) -> String {
    let start = Instant::now();
    loop {
        let status = ok(fleet(dir, &["status"]));
        let up_no_lag = status
            .lines()
            .filter(|l| l.contains(" up ") && l.trim_end().ends_with(" 0"))
            .count();
        let rows = status
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count();
        if leader(&status).is_some() && up_no_lag == nodes && rows == nodes {
            return status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "fleet did not settle:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fleet_replace_add_remove_and_drain_keep_every_record_recoverable() {
    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir, ports, _down, ..
    } = up_fleet(work.path(), &FIVE_NODES, &[1; 5]);
    let status = settled(&dir, 5);
    let endpoint = |id: u64| format!("https://127.0.0.1:{}", ports[id as usize - 1]);

    let register = register_key(&dir, work.path(), &endpoint(1), "kim");
    let key = String::from_utf8_lossy(&register).trim().to_owned();
    let recover_through = |id: u64| {
        let start = Instant::now();
        loop {
            let out = recover_key(&dir, &endpoint(id), "kim", "pw");
            if out.status.success() {
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), key);
                return;
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                err.contains("Unavailable") && start.elapsed() < DEADLINE,
                "node {id}: {err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // Replace a follower whose disk and token are lost.
    let l = leader(&status).expect("leader");
    let replaced = l % 5 + 1;
    let out = ok(fleet(
        &dir,
        &["replace-node", "--id", &replaced.to_string()],
    ));
    assert!(out.contains("new token enrolled"), "{out}");
    assert_catch_up_reported(&out, replaced);
    settled(&dir, 5);
    recover_through(replaced);

    // Drain a region, remove a node, add one back.
    let out = ok(fleet(&dir, &["drain-region", "--region", "us"]));
    assert!(out.contains("voters are now {1, 2, 5}"), "{out}");
    settled(&dir, 3);
    recover_through(5);
    ok(fleet(&dir, &["remove-node", "--id", "5"]));
    settled(&dir, 2);
    let out = ok(fleet(&dir, &["add-node", "--id", "3"]));
    assert!(out.contains("voters are now {1, 2, 3}"), "{out}");
    assert_catch_up_reported(&out, 3);
    settled(&dir, 3);
    recover_through(3);

    // The enrolment and the membership changes are in the audit trails
    // (every trail verifies in its node's token), and no account id is.
    let out = fleet(&dir, &["audit"]);
    let audit = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{audit}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for event in [
        "node_enrolled",
        "learner_added",
        "membership_changed",
        "registered",
        "guess_charged",
        "recovered",
    ] {
        assert!(
            audit.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in the trails:\n{audit}"
        );
    }
    assert!(!audit.contains("kim"), "{audit}");
}

/// Operator requests must carry the operator's signature: a forged one is
/// refused, so nobody else can pull the domain keys or change membership.
#[test]
fn operator_api_refuses_requests_not_signed_by_the_operator() {
    use vault_proto::vault::node::v1::operator_client::OperatorClient;
    use vault_proto::vault::node::v1::OperatorRequest;

    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        file: fleet_file,
        _down,
        ..
    } = up_fleet(work.path(), &FIVE_NODES, &[1; 5]);
    let peer_addr = hsm_vault::geo::FleetFile::load(&fleet_file)
        .expect("fleet file")
        .node(1)
        .expect("node 1")
        .peer_addr
        .clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // The operator's certificate gets through TLS; the signature is
        // checked on top of it.
        let operator = (
            dir.join("tls/operator/client.pem"),
            dir.join("tls/operator/client.key"),
        );
        let channel =
            vault_e2e::peer_channel(&dir.join("tls/ca.pem"), Some(&operator), 1, &peer_addr)
                .await
                .expect("connect");
        let mut c = OperatorClient::new(channel);
        let stranger = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let body = br#"{"transport":"04"}"#.to_vec();
        let me = vault_proto::operator::Target { node: 1, group: 1 };
        let forged = vault_proto::operator::request(&stranger, "ExportKeys", me, now, body.clone());
        let unsigned = OperatorRequest {
            signature: Vec::new(),
            ..forged.clone()
        };
        for (kind, request) in [("forged", forged), ("unsigned", unsigned)] {
            let r = c.export_keys(request).await.expect_err(kind);
            assert_eq!(r.code(), tonic::Code::Unauthenticated, "{r:?}");
        }
        let r = c
            .change_membership(vault_proto::operator::request(
                &stranger,
                "ChangeMembership",
                me,
                now,
                br#"{"voters":[1]}"#.to_vec(),
            ))
            .await
            .expect_err("forged membership change");
        assert_eq!(r.code(), tonic::Code::Unauthenticated);
    });
}

/// A fleet of two replica groups, each spanning the three regions: both
/// form and adopt the shard map, accounts registered through one node are
/// recovered through a node of the other group, and `fleet move-slots`
/// hands group 1's slots to group 2 with their records and guess counts.
#[test]
fn fleet_two_groups_serve_every_account_from_any_node_and_move_slots() {
    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        ports,
        up,
        _down,
        ..
    } = up_fleet(
        work.path(),
        &["eu", "eu", "us", "us", "ap", "ap"],
        &[1, 2, 1, 2, 1, 2],
    );
    assert_eq!(up.matches("listening on").count(), 6, "{up}");
    let start = Instant::now();
    let status = loop {
        let status = ok(fleet(&dir, &["status"]));
        let leaders = status
            .lines()
            .filter(|l| l.split_whitespace().nth(5) == Some("leader"))
            .count();
        if leaders == 2 && status.matches("group adopted version 1").count() == 2 {
            break status;
        }
        assert!(start.elapsed() < DEADLINE, "groups did not form: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for g in [1, 2] {
        assert!(
            status.contains(&format!("group {g}: 32768 of 65536 slots")),
            "{status}"
        );
    }
    let endpoint = |id: usize| format!("https://127.0.0.1:{}", ports[id - 1]);
    let mut keys = Vec::new();
    for i in 0..4 {
        let account = format!("acct-{i}");
        let registered = register_key(&dir, work.path(), &endpoint(1 + i % 2), &account);
        let recovered = recover_key(&dir, &endpoint(6 - i % 2), &account, "pw");
        assert!(
            recovered.status.success(),
            "{}",
            String::from_utf8_lossy(&recovered.stderr)
        );
        assert_eq!(recovered.stdout, registered, "{account}");
        keys.push(registered);
    }

    // Move every slot of group 1 to group 2, with a guess charged on a
    // record before: the record arrives with its count.
    let wrong = |via: usize| recover_key(&dir, &endpoint(via), "acct-0", "not pw");
    let before = wrong(3);
    assert_eq!(before.status.code(), Some(3), "wrong password");
    assert!(String::from_utf8_lossy(&before.stderr).contains("the guess was counted"));
    let moved = ok(fleet(
        &dir,
        &[
            "move-slots",
            "--first",
            "0",
            "--last",
            "32767",
            "--to-group",
            "2",
        ],
    ));
    assert!(moved.contains("records imported"), "{moved}");
    let status = ok(fleet(&dir, &["status"]));
    assert!(
        status.contains("group 1: 0 of 65536 slots (group adopted version 2)")
            && status.contains("group 2: 65536 of 65536 slots (group adopted version 2)"),
        "{status}"
    );
    let after = wrong(1);
    assert_eq!(after.status.code(), Some(3), "wrong password");
    // The owner's view (no answer to a guess tells the count).
    let status = vault(
        &dir,
        &endpoint(1),
        &[
            "status",
            "--account",
            "acct-0",
            "--token-file",
            work.path().join("acct-0.token").to_str().expect("utf8"),
        ],
        "",
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("registered: 8 of 10 guesses remaining"),
        "the moved record kept its count: {}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    for (i, key) in keys.iter().enumerate() {
        for via in [1, 6] {
            let recovered = recover_key(&dir, &endpoint(via), &format!("acct-{i}"), "pw");
            assert_eq!(
                &recovered.stdout, key,
                "acct-{i} through node {via} after the move"
            );
        }
    }
    // Nothing left to move: the slots are group 2's.
    let again = fleet(
        &dir,
        &[
            "move-slots",
            "--first",
            "0",
            "--last",
            "99",
            "--to-group",
            "2",
        ],
    );
    assert!(!again.status.success());
}

/// Headless Chromium: `--dump-dom` of `url` after its script ran (the page
/// renders only from `/api/fleet`), and a screenshot into `png`.
fn chromium(url: &str, png: &Path) -> String {
    let base = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1400,1100",
        "--virtual-time-budget=3000",
    ];
    let profile = tempfile::tempdir().expect("profile dir");
    let run = |extra: &str| {
        let out = Command::new("chromium")
            .args(base)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(extra)
            .arg(url)
            .output()
            .expect("chromium runs (scripts/ensure-deps.sh installs it)");
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&format!("--screenshot={}", png.display()));
    assert!(
        std::fs::metadata(png).map(|m| m.len()).unwrap_or(0) > 10_000,
        "no screenshot"
    );
    run("--dump-dom")
}

/// The attributes of node `id`'s card in a dumped dashboard page.
fn card(dom: &str, id: u64) -> String {
    let start = dom
        .find(&format!("data-node=\"{id}\""))
        .unwrap_or_else(|| panic!("node {id} not on the dashboard"));
    let tag_start = dom[..start].rfind('<').expect("tag");
    let tag_end = start + dom[start..].find('>').expect("tag end");
    dom[tag_start..tag_end].to_owned()
}

#[test]
fn dashboard_shows_every_node_with_region_and_role_and_a_killed_node_turns_unhealthy() {
    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        file: fleet_file,
        ports,
        _down,
        ..
    } = up_fleet(work.path(), &FIVE_NODES, &[1; 5]);
    let status = settled(&dir, 5);
    let leader_id = leader(&status).expect("leader");

    let port = free_ports(1)[0];
    let mut dashboard = vault_e2e::Reaped(
        Command::new(bin("fleet"))
            .arg("--dir")
            .arg(&dir)
            .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("fleet dashboard"),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // Some traffic, for the rates and the audit events.
    let endpoint = |id: u64| format!("https://127.0.0.1:{}", ports[id as usize - 1]);
    register_key(&dir, work.path(), &endpoint(1), "dana");
    for _ in 0..3 {
        ok(recover_key(&dir, &endpoint(3), "dana", "pw"));
    }
    let api_of = |addr: std::net::SocketAddr, want: &dyn Fn(&serde_json::Value) -> bool| {
        let start = Instant::now();
        loop {
            if let Ok((200, body)) = vault_e2e::http_get(addr, "/api/fleet") {
                let v: serde_json::Value = serde_json::from_str(&body).expect("JSON view");
                if want(&v) {
                    return (v, start.elapsed());
                }
            }
            assert!(start.elapsed() < DEADLINE, "the dashboard never showed it");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let api = |want: &dyn Fn(&serde_json::Value) -> bool| api_of(addr, want);
    let up = |v: &serde_json::Value| v["totals"]["nodes_up"] == 5;
    let (view, _) = api(&|v| up(v) && !v["audit"].as_array().is_none_or(Vec::is_empty));
    assert_eq!(view["groups"][0]["leader"], leader_id);

    let shots = vault_e2e::bin_dir()
        .parent()
        .expect("target dir")
        .join("dashboard");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let url = format!("http://{addr}/");
    let dom = chromium(&url, &shots.join("fleet.png"));
    let regions = ["eu", "eu", "us", "us", "ap"];
    for id in 1..=5u64 {
        let c = card(&dom, id);
        assert!(
            c.contains(&format!("data-region=\"{}\"", regions[id as usize - 1])),
            "{c}"
        );
        assert!(c.contains("data-health=\"up\""), "{c}");
        let role = if id == leader_id {
            "leader"
        } else {
            "follower"
        };
        assert!(c.contains(&format!("data-role=\"{role}\"")), "{c}");
    }
    assert_eq!(dom.matches(">healthy<").count(), 5);
    assert!(dom.contains("5 / 5"), "nodes up total");
    for event in ["registered", "guess_charged", "recovered"] {
        assert!(
            dom.contains(&format!(">{event}<")),
            "{event} not in the audit list"
        );
    }
    assert!(!dom.contains("dana"), "an account id on the dashboard");

    // Kill a follower: it turns unhealthy within seconds.
    let victim = leader_id % 5 + 1;
    ok(fleet(
        &dir,
        &["stop-node", "--id", &victim.to_string(), "--kill"],
    ));
    let (_, took) = api(&|v| {
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["id"] == victim && n["health"] == "down")
    });
    println!("node {victim} shown down {took:?} after the kill");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let dom = chromium(&url, &shots.join("fleet-node-down.png"));
    assert!(card(&dom, victim).contains("data-health=\"down\""));
    assert!(dom.contains(">DOWN<"));
    assert!(dom.contains("4 / 5"));
    let (status, metrics) = vault_e2e::http_get(addr, "/metrics").expect("fleet metrics");
    assert_eq!(status, 200);
    assert_eq!(vault_e2e::metric(&metrics, "vault_fleet_node_up", &[]), 4.0);
    assert_eq!(
        vault_e2e::metric(
            &metrics,
            "vault_fleet_node_up",
            &[("node", &victim.to_string())]
        ),
        0.0
    );
    dashboard.0.kill().ok();

    // From another machine: only the fleet CA and the operator's
    // certificate and key, and a fleet file that names each node's metrics
    // listener. `status` and a second dashboard see the same fleet.
    let remote = work.path().join("remote");
    for sub in ["tls", "operator"] {
        copy_dir(&dir.join(sub), &remote.join(sub));
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).expect("state"))
            .expect("state.json");
    let mut toml = std::fs::read_to_string(&fleet_file).expect("fleet file");
    for id in 1..=5u64 {
        let metrics = state["nodes"][id.to_string()]["metrics_addr"]
            .as_str()
            .expect("metrics address");
        toml = toml.replace(
            &format!("[[node]]\nid = {id}\n"),
            &format!("[[node]]\nid = {id}\nmetrics_addr = \"{metrics}\"\n"),
        );
    }
    let remote_file = work.path().join("remote-fleet.toml");
    std::fs::write(&remote_file, toml).expect("fleet file");
    let remote_file = remote_file.to_str().expect("utf8");
    let status = ok(fleet(&remote, &["status", "--fleet-file", remote_file]));
    assert_eq!(leader(&status), Some(leader_id), "{status}");
    assert_eq!(status.matches(" DOWN").count(), 1, "{status}");
    assert_eq!(status.matches(" up ").count(), 4, "{status}");
    let port = free_ports(1)[0];
    let mut watching = vault_e2e::Reaped(
        Command::new(bin("fleet"))
            .arg("--dir")
            .arg(&remote)
            .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--fleet-file", remote_file])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("fleet dashboard"),
    );
    let remote_addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (view, _) = api_of(remote_addr, &|v| {
        v["totals"]["nodes_up"] == 4
            && v["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|n| n["health"] == "down" || n["term"].as_u64().is_some_and(|t| t >= 1))
    });
    assert_eq!(view["groups"][0]["leader"], leader_id);
    assert_eq!(view["totals"]["nodes"], 5);
    // Audit trails are files on the nodes' machines: none shown from here.
    assert!(view["audit"].as_array().is_none_or(Vec::is_empty), "{view}");
    watching.0.kill().ok();
}

/// Copies a directory tree (certificates and keys for a remote operator).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The fleet tool on either PKCS#11 implementation (`VAULT_PKCS11`): a
/// one-node fleet is made (token, certificates, process), serves a key, and
/// its audit trail verifies. Where the token cannot clone keys (kryoptic:
/// no key can be marked `CKA_TRUSTED`), a fleet of several nodes is made by
/// importing the domain keys into each token, and says so; a node joining
/// the running fleet would need a ceremony, so `add-node` and
/// `replace-node` are refused before anything is stopped or deleted.
#[test]
fn fleet_up_serves_on_either_token_and_imports_keys_where_it_cannot_clone() {
    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        ports,
        up,
        _down,
        ..
    } = up_fleet(work.path(), &["eu"], &[1]);
    assert_eq!(up.matches("listening on").count(), 1, "{up}");
    let endpoint = format!("https://127.0.0.1:{}", ports[0]);
    let start = Instant::now();
    let key = loop {
        let status = ok(fleet(&dir, &["status"]));
        if leader(&status) == Some(1) {
            break register_key(&dir, work.path(), &endpoint, "uma");
        }
        assert!(start.elapsed() < DEADLINE, "no leader: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let recovered = recover_key(&dir, &endpoint, "uma", "pw");
    assert!(
        recovered.status.success(),
        "{}",
        String::from_utf8_lossy(&recovered.stderr)
    );
    assert_eq!(recovered.stdout, key);
    ok(fleet(&dir, &["down"]));
    ok(fleet(&dir, &["audit"]));

    if softhsm_test_harness::provider() == softhsm_test_harness::Provider::Kryoptic {
        let two = work.path().join("two");
        std::fs::create_dir_all(&two).expect("dir");
        let UpFleet { dir, up, _down, .. } = up_fleet(&two, &["eu", "us"], &[1, 1]);
        assert!(up.contains("cannot clone keys"), "{up}");
        assert_eq!(up.matches("domain keys imported").count(), 2, "{up}");
        assert_eq!(up.matches("listening on").count(), 2, "{up}");
        for args in [
            &["replace-node", "--id", "2"][..],
            &["add-node", "--id", "3"],
        ] {
            let out = fleet(&dir, args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(err.contains("cannot clone keys"), "{err}");
        }
        // Nothing was stopped: both nodes still run.
        let status = ok(fleet(&dir, &["status"]));
        assert!(!status.contains("DOWN"), "{status}");
    }
}

/// `fleet enroll-token` running in the background for a token on another
/// machine (its own token store, no fleet directory); killed if dropped.
/// What it prints is collected as it comes (the operator reads the
/// transport key's fingerprint off that screen).
struct Enrolling(
    Option<std::process::Child>,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
);

impl Enrolling {
    fn start(
        token: &softhsm_test_harness::TestToken,
        vault_pub: &Path,
        (request, package): (&Path, &Path),
    ) -> Self {
        let child = Command::new(bin("fleet"))
            .envs(token.env())
            .env("RUST_BACKTRACE", "0")
            .args([
                "enroll-token",
                "--label",
                token.label(),
                "--wait-secs",
                "60",
            ])
            .arg("--pin-file")
            .arg(token.pin_file())
            .arg("--pkcs11-module")
            .arg(softhsm_test_harness::module_path())
            .arg("--vault-public-key")
            .arg(vault_pub)
            .arg("--request")
            .arg(request)
            .arg("--package")
            .arg(package)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("fleet enroll-token");
        let mut child = child;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Enrolling(Some(child), rx, Vec::new())
    }

    /// The transport key fingerprint it printed.
    fn fingerprint(&mut self) -> String {
        loop {
            if let Some(fp) = self
                .2
                .iter()
                .find_map(|l| l.strip_prefix("transport key fingerprint: "))
            {
                return fp.trim().to_owned();
            }
            match self.1.recv_timeout(DEADLINE) {
                Ok(line) => self.2.push(line),
                Err(_) => panic!("enroll-token printed no fingerprint: {:?}", self.2),
            }
        }
    }

    fn running(&mut self) -> bool {
        let child = self.0.as_mut().expect("child");
        child.try_wait().expect("wait").is_none()
    }

    fn finish(mut self) -> Output {
        let child = self.0.take().expect("child");
        let mut out = child.wait_with_output().expect("enroll-token ends");
        let mut said: Vec<String> = std::mem::take(&mut self.2);
        // Every line: the reader ends when the exited child's stdout closes.
        said.extend(self.1.iter());
        out.stdout = said.join("\n").into_bytes();
        out
    }
}

impl Drop for Enrolling {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for the enrollment request, has member `member` answer it with
/// `fleet export-keys`, and returns how `enroll-token` ended.
fn answer_enrollment(
    dir: &Path,
    (member, peer_addr): (u64, &str),
    (request, package): (&Path, &Path),
    mut enrolling: Enrolling,
) -> Output {
    let start = Instant::now();
    while !request.exists() {
        assert!(
            enrolling.running(),
            "enroll-token ended before writing a request"
        );
        assert!(start.elapsed() < DEADLINE, "no enrollment request");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(request).expect("request");
    assert!(text.contains("\"transport\""), "{text}");
    let fingerprint = enrolling.fingerprint();
    let out = ok(export_keys(
        dir,
        &fingerprint,
        (member, peer_addr),
        (request, package),
    ));
    assert!(out.contains(&format!("from node {member}")), "{out}");
    enrolling.finish()
}

/// `fleet export-keys` for `request`, confirming `fingerprint`, through
/// member `member`; the package goes to `package`.
fn export_keys(
    dir: &Path,
    fingerprint: &str,
    (member, peer_addr): (u64, &str),
    (request, package): (&Path, &Path),
) -> Output {
    fleet(
        dir,
        &[
            "export-keys",
            "--expect-fingerprint",
            fingerprint,
            "--member",
            &member.to_string(),
            "--peer-addr",
            peer_addr,
            "--request",
            request.to_str().expect("utf8"),
            "--out",
            package.to_str().expect("utf8"),
        ],
    )
}

/// The enrollment request travels between machines unauthenticated: one
/// swapped on the way (carrying the attacker's transport key) is refused by
/// `export-keys`, whose operator confirms the fingerprint `enroll-token`
/// showed on the new node's machine; no package is made.
#[test]
fn fleet_export_keys_refuses_a_swapped_enrollment_request() {
    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        file: fleet_file,
        _down,
        ..
    } = up_fleet(work.path(), &["eu"], &[1]);
    let fleet_spec = hsm_vault::geo::FleetFile::load(&fleet_file).expect("fleet file");
    let peer_addr = fleet_spec.node(1).expect("node").peer_addr.clone();
    let remote = softhsm_test_harness::TestToken::new("swapped-node").expect("token");
    let (request, package) = (
        work.path().join("request.json"),
        work.path().join("package.json"),
    );
    let mut enrolling = Enrolling::start(&remote, &dir.join("vault.pub"), (&request, &package));
    let start = Instant::now();
    while !request.exists() {
        assert!(enrolling.running(), "enroll-token ended early");
        assert!(start.elapsed() < DEADLINE, "no enrollment request");
        std::thread::sleep(Duration::from_millis(100));
    }
    let fingerprint = enrolling.fingerprint();
    // The attacker's key in place of the token's.
    let attacker = p256::SecretKey::random(&mut rand::rngs::OsRng);
    std::fs::write(
        &request,
        serde_json::json!({
            "label": "swapped-node",
            "transport": hex::encode(attacker.public_key().to_sec1_bytes()),
        })
        .to_string(),
    )
    .expect("swap the request");
    let out = export_keys(&dir, &fingerprint, (1, &peer_addr), (&request, &package));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("fingerprint"), "{err}");
    assert!(err.contains("no keys were exported"), "{err}");
    assert!(!package.exists(), "a package was written");
}

/// A token on another machine joins the fleet's key domain by a ceremony
/// carried in two files: `fleet enroll-token` on that machine (its own
/// token store, no fleet directory) writes a request and waits; `fleet
/// export-keys` on the operator's (the fleet directory's operator
/// certificate and signing key) has a running member wrap the domain keys
/// for it; the token then holds the fleet's keys. A package whose AKE key
/// is not the vault public key given is refused and leaves the token empty.
#[test]
fn fleet_enrolls_a_token_on_another_machine_by_request_and_package_files() {
    use hsm_vault::partition::{KeySetup, Module, Partition};

    let work = tempfile::tempdir().expect("dir");
    let UpFleet {
        dir,
        file: fleet_file,
        _down,
        ..
    } = up_fleet(work.path(), &["eu", "us", "ap"], &[1, 1, 1]);
    let fleet_spec = hsm_vault::geo::FleetFile::load(&fleet_file).expect("fleet file");
    let peer_addr = |id: u64| fleet_spec.node(id).expect("node").peer_addr.clone();
    let remote = softhsm_test_harness::TestToken::new("remote-node").expect("token");
    let (request, package) = (
        work.path().join("request.json"),
        work.path().join("package.json"),
    );
    let files = (request.as_path(), package.as_path());

    // Pinned to another key: the real fleet's package is refused.
    let other = work.path().join("other.pub");
    let stranger = p256::SecretKey::random(&mut rand::rngs::OsRng);
    std::fs::write(&other, hex::encode(stranger.public_key().to_sec1_bytes())).expect("other.pub");
    let refused = answer_enrollment(
        &dir,
        (1, &peer_addr(1)),
        files,
        Enrolling::start(&remote, &other, files),
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("another key domain"), "{err}");
    assert!(err.contains("not enrolled"), "{err}");

    // The right key, another member: enrolled (which also shows the refused
    // run left no domain key behind: enrollment starts only on an empty token).
    std::fs::remove_file(&request).expect("old request");
    std::fs::remove_file(&package).expect("old package");
    let vault_pub = dir.join("vault.pub");
    let enrolled = answer_enrollment(
        &dir,
        (2, &peer_addr(2)),
        files,
        Enrolling::start(&remote, &vault_pub, files),
    );
    let said = String::from_utf8_lossy(&enrolled.stdout);
    assert!(
        enrolled.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    assert!(said.contains("token remote-node: enrolled"), "{said}");

    // The token holds every domain key, and the AKE key is the fleet's.
    remote.use_in_this_process().expect("env");
    let module = Module::load(&softhsm_test_harness::module_path()).expect("module");
    let partition = Partition::open_in(
        &module,
        remote.label(),
        remote.pin(),
        KeySetup::RequireExisting,
    )
    .expect("the enrolled token opens with its domain keys");
    let pinned = std::fs::read_to_string(&vault_pub).expect("vault.pub");
    let pinned =
        p256::PublicKey::from_sec1_bytes(&hex::decode(pinned.trim()).expect("hex")).expect("key");
    assert_eq!(
        p256::PublicKey::from_sec1_bytes(partition.ake_public_key()).expect("ake key"),
        pinned
    );
    drop(partition);

    // A token that belongs to a domain is not enrolled again.
    std::fs::remove_file(&request).expect("request");
    std::fs::remove_file(&package).expect("package");
    let again = Enrolling::start(&remote, &vault_pub, files).finish();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("belongs to a domain"), "{err}");
    assert!(!request.exists());
}
