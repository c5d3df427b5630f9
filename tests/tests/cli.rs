//! The `vault` CLI end to end: `backup create` / `restore` / `disable`
//! against a real vault, on a 50 MiB file.

use std::path::Path;
use std::process::{Command, Output};

use rand::RngCore;
use vault_e2e::VaultNode;

const SIZE: usize = 50 * 1024 * 1024;

fn run(cmd: Command, stdin: &str) -> Output {
    vault_e2e::run_with_stdin(cmd, stdin)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vault failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

fn big_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("chats.db");
    let mut data = vec![0u8; SIZE];
    rand::rngs::OsRng.fill_bytes(&mut data);
    std::fs::write(&path, &data).expect("write input");
    path
}

#[test]
fn invariant4_backup_round_trips_50mib_with_a_password_and_refuses_tampering() {
    let node = VaultNode::start("cli-pw");
    let dir = tempfile::tempdir().expect("dir");
    let input = big_file(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, node.bearer("alice")).expect("token");
    let enc = dir.path().join("backup.enc");
    let restored = dir.path().join("restored.db");

    let mut create = node.cli();
    create.args([
        "backup",
        "create",
        "--account",
        "alice",
        "--password-stdin",
        "--in",
    ]);
    create
        .arg(&input)
        .arg("--out")
        .arg(&enc)
        .arg("--token-file")
        .arg(&token);
    ok(&run(create, "my backup password\n"));
    assert!(std::fs::metadata(&enc).expect("backup").len() > SIZE as u64);

    let restore = |password: &str, from: &Path| {
        let mut c = node.cli();
        c.args([
            "backup",
            "restore",
            "--account",
            "alice",
            "--password-stdin",
            "--in",
        ]);
        c.arg(from).arg("--out").arg(&restored);
        run(c, &format!("{password}\n"))
    };
    let out = restore("wrong password", &enc);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong password: the guess was counted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&restore("my backup password", &enc));
    assert!(same_file(&input, &restored), "restored file differs");
    std::fs::remove_file(&restored).expect("rm");

    // A create that cannot read its input fails before it replaces the key
    // the existing backup needs.
    let mut failing = node.cli();
    failing.args([
        "backup",
        "create",
        "--account",
        "alice",
        "--password-stdin",
        "--in",
    ]);
    failing
        .arg(dir.path().join("missing.db"))
        .arg("--out")
        .arg(dir.path().join("x.enc"));
    failing.arg("--token-file").arg(&token);
    assert!(!run(failing, "another password\n").status.success());
    ok(&restore("my backup password", &enc));
    assert!(same_file(&input, &restored));
    std::fs::remove_file(&restored).expect("rm");

    // A flipped byte and a truncated file are refused, leaving no output.
    let mut bytes = std::fs::read(&enc).expect("read backup");
    let tampered = dir.path().join("tampered.enc");
    bytes[SIZE / 2] ^= 0x40;
    std::fs::write(&tampered, &bytes).expect("write");
    bytes[SIZE / 2] ^= 0x40;
    let truncated = dir.path().join("truncated.enc");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).expect("write");
    for bad in [&tampered, &truncated] {
        let out = restore("my backup password", bad);
        assert_eq!(
            out.status.code(),
            Some(9),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("failed authentication"));
        assert!(!restored.exists(), "no partial plaintext is left behind");
    }

    // Disable: the record is deleted; the backup can no longer be restored.
    let mut disable = node.cli();
    disable.args([
        "backup",
        "disable",
        "--account",
        "alice",
        "--password-stdin",
        "--token-file",
    ]);
    disable.arg(&token);
    ok(&run(disable, "my backup password\n"));
    let out = restore("my backup password", &enc);
    assert_eq!(
        out.status.code(),
        Some(3),
        "an unknown account looks like a wrong password"
    );
}

#[test]
fn backup_round_trips_50mib_with_the_64_digit_key_and_refuses_bad_keys() {
    let dir = tempfile::tempdir().expect("dir");
    let input = big_file(dir.path());
    let enc = dir.path().join("backup.enc");
    let restored = dir.path().join("restored.db");
    let vault = vault_e2e::bin("vault");

    let mut create = Command::new(&vault);
    create
        .args(["backup", "create", "--no-vault", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&enc);
    let key = ok(&run(create, ""));
    let digits: String = key.chars().filter(char::is_ascii_hexdigit).collect();
    assert_eq!(
        digits.len(),
        64,
        "the key is printed as 64 hex digits: {key:?}"
    );

    let restore = |key: &str| {
        let mut c = Command::new(&vault);
        c.args(["backup", "restore", "--no-vault", "--key-stdin", "--in"])
            .arg(&enc)
            .arg("--out")
            .arg(&restored);
        run(c, &format!("{key}\n"))
    };
    ok(&restore(key.trim()));
    assert!(same_file(&input, &restored));

    let out = restore(&digits[..63]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad key format"));
    let mut wrong = digits.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let out = restore(std::str::from_utf8(&wrong).expect("ascii"));
    assert_eq!(out.status.code(), Some(9));
}

#[test]
fn unreachable_vault_gets_a_clear_message() {
    let node = VaultNode::start("cli-down");
    let key_file = node.public_key_path();
    let dir = tempfile::tempdir().expect("dir");
    std::fs::copy(&key_file, dir.path().join("vault.pub")).expect("copy key");
    let mut c = node.cli();
    drop(node);
    c.env("VAULT_PUBLIC_KEY", dir.path().join("vault.pub"))
        .args(["key", "recover", "--account", "x", "--password-stdin"]);
    let out = run(c, "pw\n");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vault unreachable"));
}

#[test]
fn invariant4_raw_key_register_then_recover_through_the_cli() {
    let node = VaultNode::start("cli-key");
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("token");
    std::fs::write(&token, node.bearer("kim")).expect("token");
    let mut register = node.cli();
    register.args([
        "key",
        "register",
        "--generate",
        "--account",
        "kim",
        "--password-stdin",
        "--token-file",
    ]);
    register.arg(&token);
    let key = ok(&run(register, "pw for kim\n"));
    assert_eq!(key.trim().len(), 64);
    let mut recover = node.cli();
    recover.args(["key", "recover", "--account", "kim", "--password-stdin"]);
    assert_eq!(ok(&run(recover, "pw for kim\n")).trim(), key.trim());
    // A key given on standard input, after the password line.
    let given = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let mut register = node.cli();
    register.args([
        "key",
        "register",
        "--account",
        "kim",
        "--password-stdin",
        "--token-file",
    ]);
    register.arg(&token);
    ok(&run(register, &format!("second pw\n{given}\n")));
    let mut recover = node.cli();
    recover.args(["key", "recover", "--account", "kim", "--password-stdin"]);
    assert_eq!(ok(&run(recover, "second pw\n")).trim(), given);
}
