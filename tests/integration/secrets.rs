//! Secrets end to end through the binary: decrypted into place, and never
//! anywhere else.

use std::process::Command;

use crate::support::*;

const MARKER: &str = "CANARY-d41f7e2b-never-leak";

fn canary_repo() -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    let enc = std::fs::read_to_string(workspace().join("tests/fixtures/secrets/canary.enc.yaml"))
        .unwrap();
    r.write("secrets/db.enc.yaml", &enc);
    r.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app/db.conf\"\ntemplate = \"db.conf.tera\"\n\n\
         [[files]]\npath = \"/etc/app/db.json\"\nsecret = \"secrets/db.enc.yaml\"\nformat = \"json\"\n\n\
         [[files]]\npath = \"/etc/app/public.conf\"\nsource = \"public.conf\"\n",
    );
    r.write("roles/app/files/db.conf.tera", "user={{ secret(file=\"secrets/db.enc.yaml\", key=\"db.user\") }}\npassword={{ secret(file=\"secrets/db.enc.yaml\", key=\"db.password\") }}\n");
    r.write("roles/app/files/public.conf", "nothing secret\n");
    r.commit("with a secret");
    r
}

fn keys_arg() -> Vec<String> {
    vec![
        "--age-key".into(),
        workspace()
            .join("tests/fixtures/secrets/keys.txt")
            .display()
            .to_string(),
    ]
}

/// Every file under `dir` containing `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
            {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn canary_secret_reaches_only_its_target_files_which_are_0600() {
    let repo = canary_repo();
    let host = Host::new("h");
    let k = keys_arg();
    let mut args = vec!["sync", "--once"];
    args.extend(k.iter().map(String::as_str));
    let sync = host.run(repo.path(), &args).ok();
    let plan_args: Vec<&str> = ["plan", "--format", "json"]
        .iter()
        .copied()
        .chain(k.iter().map(String::as_str))
        .collect();
    // Change the secret-bearing file on the host, so plan has a diff to hide.
    std::fs::write(
        host.path("/etc/app/db.conf"),
        format!("password={MARKER}-old\n"),
    )
    .unwrap();
    let plan = host.run(repo.path(), &plan_args).ok();
    let plan_text_args: Vec<&str> = ["plan"]
        .iter()
        .copied()
        .chain(k.iter().map(String::as_str))
        .collect();
    let plan_text = host.run(repo.path(), &plan_text_args).ok();
    host.run(repo.path(), &args).ok();
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let history = host.run(repo.path(), &["history", "--format", "json"]).ok();

    for (what, text) in [
        ("sync stdout", &sync.stdout),
        ("sync log", &sync.stderr),
        ("plan json", &plan.stdout),
        ("plan text", &plan_text.stdout),
        ("plan log", &plan.stderr),
        ("status", &status.stdout),
        ("history", &history.stdout),
    ] {
        assert!(
            !text.contains(MARKER),
            "the secret leaked into {what}:\n{text}"
        );
    }
    assert!(
        plan_text.stdout.contains("sensitive content changed"),
        "{}",
        plan_text.stdout
    );
    let in_state = files_containing(host.state.path(), MARKER);
    // The only copies in the state dir are the 0600 backups needed to revert.
    for f in &in_state {
        assert!(
            f.contains("/tx/") && f.contains("/backups/"),
            "secret in state file {f}"
        );
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(f).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "{f} is readable by others");
    }
    let mut in_root = files_containing(host.root.path(), MARKER);
    in_root.sort();
    assert_eq!(in_root.len(), 2, "{in_root:?}");
    for f in &in_root {
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(f).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(host
        .read("/etc/app/db.conf")
        .unwrap()
        .contains(&format!("password={MARKER}\n")));
    let public = std::fs::metadata(host.path("/etc/app/public.conf")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&public.permissions()) & 0o777,
        0o644
    );
}

#[test]
fn wrong_key_is_a_clear_error_and_nothing_is_applied() {
    let repo = canary_repo();
    let host = Host::new("h");
    let other = tempfile::tempdir().unwrap();
    let key = other.path().join("other.txt");
    // A valid age identity that is not a recipient of the file.
    std::fs::write(
        &key,
        "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["sync", "--once", "--no-config", "--host", "h", "--source"])
        .arg(repo.path())
        .arg("--root")
        .arg(host.root.path())
        .arg("--state-dir")
        .arg(host.state.path())
        .arg("--age-key")
        .arg(&key)
        .env_remove("SOPS_AGE_KEY")
        .env_remove("SOPS_AGE_KEY_FILE")
        .env("HOME", other.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("secrets/db.enc.yaml"), "{err}");
    // It says which key was tried and what to do, and quotes no private
    // key (the secret itself was never decrypted, so cannot appear).
    assert!(
        err.contains("none of the available identities")
            && err.contains(&key.display().to_string()),
        "{err}"
    );
    assert!(err.contains("sops updatekeys"), "{err}");
    assert!(!err.contains("AGE-SECRET-KEY"), "{err}");
    assert!(host.tree().is_empty(), "nothing may be written");
}

#[test]
fn secrets_decrypt_and_check_commands() {
    let file = workspace().join("tests/fixtures/secrets/canary.enc.yaml");
    let k = keys_arg();
    let out = Command::new(BIN)
        .args(["secrets", "check", "--no-config"])
        .args(&k)
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("MAC verified"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(MARKER));
    let out = Command::new(BIN)
        .args(["secrets", "decrypt", "--format", "json", "--no-config"])
        .args(&k)
        .arg(&file)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["db"]["password"], MARKER);
}

#[test]
fn host_recipient_prints_the_ssh_and_age_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    let key = workspace().join("tests/fixtures/secrets/ssh_host_ed25519_key");
    std::fs::write(&cfg, format!("ssh_host_keys = [\"{}\"]\n", key.display())).unwrap();
    let out = Command::new(BIN)
        .args(["host-recipient", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let want = pubkey
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.lines().any(|l| l == want), "{text}");
    assert!(text.lines().any(|l| l.starts_with("age1")), "{text}");
}

/// Issue 13 §2: an identity file readable by others is used, with a
/// warning that says what to do (as ssh does); a 0600 one gives none.
#[test]
fn a_world_readable_age_key_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let repo = canary_repo();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("age.key");
    std::fs::copy(workspace().join("tests/fixtures/secrets/keys.txt"), &key).unwrap();
    for (mode, warned) in [(0o644, true), (0o640, true), (0o600, false)] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let host = Host::new("h");
        let run = host
            .run(
                repo.path(),
                &["sync", "--once", "--age-key", &key.display().to_string()],
            )
            .ok();
        assert_eq!(
            run.stderr
                .contains(&format!("run `chmod 600 {}`", key.display())),
            warned,
            "mode {mode:o}: {}",
            run.stderr
        );
    }
}

/// Issue 14 §3: `validate` needed every secret key. With
/// `--skip-secrets` it checks structure and templates, renders secrets as
/// placeholders and lists the files it did not decrypt; a missing SOPS
/// file is still an error.
#[test]
fn validate_skip_secrets_checks_everything_but_the_values() {
    let repo = canary_repo();
    // Without keys it fails (the identities are not there).
    assert_eq!(validate(repo.path(), &[]).0, Some(3));
    let (code, text) = validate(repo.path(), &["--skip-secrets"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("not decrypted (--skip-secrets") && text.contains("secrets/db.enc.yaml"),
        "{text}"
    );
    assert!(!text.contains(MARKER));
    // A secret naming a file that is not there is still caught.
    repo.write(
        "roles/app/files/db.conf.tera",
        "{{ secret(file=\"secrets/missing.enc.yaml\", key=\"x\") }}\n",
    );
    repo.commit("typo");
    let (code, text) = validate(repo.path(), &["--skip-secrets"]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("secrets/missing.enc.yaml"), "{text}");
}
