//! `driftless init DIR`: the scaffolded repository validates, plans and
//! syncs as it comes; a non-empty directory is refused; `--force` never
//! overwrites; the repository has one clean commit on `main` (checked with
//! the real git CLI).

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// `driftless init ARGS…` with git identity and config from a clean slate
/// unless `identity` is given: (exit code, stdout, stderr).
fn init_with(args: &[&str], identity: Option<(&str, &str)>) -> Run {
    let home = tempfile::tempdir().unwrap();
    let mut c = Command::new(BIN);
    c.arg("init")
        .args(args)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("EMAIL");
    for v in [
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
    ] {
        c.env_remove(v);
    }
    if let Some((name, email)) = identity {
        for v in ["GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"] {
            c.env(v, name);
        }
        for v in ["GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"] {
            c.env(v, email);
        }
    }
    let out = c.output().expect("driftless runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn init(args: &[&str]) -> Run {
    init_with(args, Some(("Alice Admin", "alice@example.com")))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` (relative, sorted) with its content, `.git` too.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if p.is_dir() {
                out.push((format!("{rel}/"), Vec::new()));
                walk(base, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn mode(p: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o7777
}

/// The scaffold's files, as `git ls-files` would list them.
const SCAFFOLD: &[&str] = &[
    "README.md",
    "driftless.toml",
    "hosts/web1.toml",
    "roles/app-behind-proxy/files/app.container.tera",
    "roles/app-behind-proxy/files/nginx-app.conf.tera",
    "roles/app-behind-proxy/role.toml",
    "roles/cron-job/files/site-jobs.tera",
    "roles/cron-job/role.toml",
    "roles/sshd-hardening/files/sshd.conf.tera",
    "roles/sshd-hardening/role.toml",
    "roles/timesync/files/timesyncd.conf.tera",
    "roles/timesync/role.toml",
    "roles/unit-dropin/files/cron.service.conf.tera",
    "roles/unit-dropin/role.toml",
];

#[test]
fn init_validates_plans_and_syncs_out_of_the_box() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("config");
    let run = init(&[s(&repo), "--host", "web1"]).ok();
    for f in SCAFFOLD {
        assert!(
            run.stdout.contains(&format!("created  {f}")),
            "{f}:\n{}",
            run.stdout
        );
    }
    assert!(run
        .stdout
        .contains(&format!("driftless validate {}", repo.display())));
    assert!(run
        .stdout
        .contains(&format!("source = \"{}\"", repo.display())));
    assert!(run.stdout.contains("--host web1 --root"), "{}", run.stdout);

    let (code, out) = validate(&repo, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok    web1: 3 file(s)"), "{out}");

    let host = Host::new("web1");
    let plan = host.run(&repo, &["plan", "--no-diff"]).ok();
    for target in [
        "/etc/systemd/timesyncd.conf.d/driftless.conf",
        "/etc/systemd/system/cron.service.d/driftless.conf",
        "/etc/cron.d/site-jobs",
    ] {
        assert!(plan.stdout.contains(target), "{target}:\n{}", plan.stdout);
    }
    assert!(host.tree().is_empty(), "plan wrote: {:?}", host.tree());

    let sync = host.sync(&repo).ok();
    assert!(sync.stdout.contains("3 created"), "{}", sync.stdout);
    let ntp = host
        .read("/etc/systemd/timesyncd.conf.d/driftless.conf")
        .unwrap();
    assert!(
        ntp.contains("[Time]\nNTP=0.debian.pool.ntp.org 1.debian.pool.ntp.org\n"),
        "{ntp}"
    );
    assert!(ntp.contains("Managed by driftless"), "{ntp}");
    let dropin = host
        .read("/etc/systemd/system/cron.service.d/driftless.conf")
        .unwrap();
    assert!(dropin.contains("[Service]\n"), "{dropin}");
    assert!(
        dropin.contains("CPUWeight=50\n") && dropin.contains("Nice=10\n"),
        "{dropin}"
    );
    let cron = host.read("/etc/cron.d/site-jobs").unwrap();
    assert!(
        cron.contains("\n17 6 * * * root df -hl -x tmpfs -x devtmpfs | logger -t disk-report\n"),
        "{cron}"
    );
    assert!(cron.ends_with('\n'), "cron needs a final newline: {cron:?}");
    assert_eq!(mode(&host.path("/etc/cron.d/site-jobs")), 0o644);
    // Opt-in roles are not applied.
    assert!(host
        .read("/etc/ssh/sshd_config.d/10-driftless.conf")
        .is_none());
    assert!(host.read("/etc/nginx/conf.d/app.conf").is_none());

    // A second run has nothing to do.
    let again = host.sync(&repo).ok();
    assert!(again.stdout.contains("already applied"), "{}", again.stdout);
}

#[test]
fn every_starter_role_renders_once_uncommented_in_the_host_file() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("config");
    init(&[s(&repo), "--host", "web1"]).ok();
    // What a user does: uncomment the opt-in roles, set a few variables.
    let host_file = std::fs::read_to_string(repo.join("hosts/web1.toml")).unwrap();
    let all = host_file
        .replace("# \"sshd-hardening\",", "\"sshd-hardening\",")
        .replace("# \"app-behind-proxy\",", "\"app-behind-proxy\",")
        .replace(
            "# app = { image",
            "app = { port = 9090, server_name = \"app.test\" }\n# app = { image",
        );
    assert_ne!(all, host_file, "the opt-in roles are listed, commented");
    std::fs::write(repo.join("hosts/all.toml"), &all).unwrap();
    std::fs::write(
        repo.join("hosts/keys-and-passwords.toml"),
        all.replace(
            "# sshd = { password_authentication = true }",
            "sshd = { password_authentication = true }",
        ),
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "all roles"]);

    let (code, out) = validate(&repo, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok    all: 6 file(s), 2 check(s)"), "{out}");

    let host = Host::new("all");
    host.sync(&repo).ok();
    let sshd = host
        .read("/etc/ssh/sshd_config.d/10-driftless.conf")
        .unwrap();
    for line in [
        "PermitRootLogin prohibit-password\n",
        "PasswordAuthentication no\n",
        "KbdInteractiveAuthentication no\n",
        "PermitEmptyPasswords no\n",
        "MaxAuthTries 3\n",
    ] {
        assert!(sshd.contains(line), "{line}:\n{sshd}");
    }
    let container = host.read("/etc/containers/systemd/app.container").unwrap();
    assert!(container.contains("[Container]\n"), "{container}");
    assert!(
        container.contains("\nImage=docker.io/traefik/whoami:v1.10\n"),
        "{container}"
    );
    assert!(
        container.contains("\nPublishPort=127.0.0.1:9090:80\n"),
        "host vars merge into the role's table: {container}"
    );
    assert!(
        container.contains("[Install]\nWantedBy=multi-user.target\n"),
        "{container}"
    );
    let nginx = host.read("/etc/nginx/conf.d/app.conf").unwrap();
    assert!(nginx.contains("server 127.0.0.1:9090;"), "{nginx}");
    assert!(nginx.contains("server_name app.test 127.0.0.1;"), "{nginx}");
    assert!(nginx.contains("proxy_pass http://app_backend;"), "{nginx}");

    // The variable that allows passwords, and only that, changes.
    let pw = Host::new("keys-and-passwords");
    pw.sync(&repo).ok();
    let sshd_pw = pw.read("/etc/ssh/sshd_config.d/10-driftless.conf").unwrap();
    assert!(
        sshd_pw.contains("PasswordAuthentication yes\n"),
        "{sshd_pw}"
    );
    assert!(
        sshd_pw.contains("PermitRootLogin prohibit-password\n"),
        "{sshd_pw}"
    );
}

#[test]
fn the_repository_has_one_clean_commit_on_main() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("config");
    init(&[s(&repo), "--host", "web1"]).ok();
    assert_eq!(git(&repo, &["symbolic-ref", "HEAD"]), "refs/heads/main");
    assert_eq!(git(&repo, &["rev-list", "--count", "HEAD"]), "1");
    assert_eq!(
        git(&repo, &["status", "--porcelain", "--untracked-files=all"]),
        ""
    );
    // The index matches the tree without a refresh (stat data written).
    assert_eq!(git(&repo, &["diff-files", "--name-only"]), "");
    let mut files: Vec<String> = git(&repo, &["ls-files"])
        .lines()
        .map(str::to_string)
        .collect();
    files.sort();
    assert_eq!(files, SCAFFOLD);
    git(&repo, &["fsck", "--strict", "--no-progress"]);
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%an <%ae>|%cn <%ce>"]),
        "Alice Admin <alice@example.com>|Alice Admin <alice@example.com>"
    );
}

#[test]
fn without_a_git_identity_the_commit_says_who_made_it() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("config");
    let run = init_with(&[s(&repo), "--host", "web1"], None).ok();
    assert!(
        run.stdout.contains("no git identity configured"),
        "{}",
        run.stdout
    );
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%an <%ae>"]),
        "driftless init <driftless-init@localhost>"
    );
}

#[test]
fn the_host_file_is_named_after_the_hostname_by_default() {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("config");
    init(&[s(&repo)]).ok();
    let host_file = std::fs::read_to_string(repo.join(format!("hosts/{name}.toml"))).unwrap();
    assert!(
        host_file.contains(&format!("The host \"{name}\"")),
        "{host_file}"
    );
    let (code, out) = validate(&repo, &[]);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn a_non_empty_directory_is_refused_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("notes.txt"), "mine\n").unwrap();
    let before = snapshot(t.path());
    let run = init(&[s(t.path()), "--host", "web1"]).code(2);
    assert!(run.stderr.contains("is not empty"), "{}", run.stderr);
    assert!(run.stderr.contains(s(t.path())), "{}", run.stderr);
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
    assert_eq!(snapshot(t.path()), before);

    // A file is not a directory, --force or not.
    let file = t.path().join("notes.txt");
    for args in [vec![s(&file)], vec![s(&file), "--force"]] {
        let run = init(&args).code(2);
        assert!(run.stderr.contains("is not a directory"), "{}", run.stderr);
    }
    assert_eq!(snapshot(t.path()), before);

    // A host name that cannot name a file.
    let fresh = t.path().join("fresh");
    let run = init(&[s(&fresh), "--host", "a/b"]).code(2);
    assert!(run.stderr.contains("--host"), "{}", run.stderr);
    assert!(!fresh.exists());
}

#[test]
fn force_adds_only_missing_files_and_never_overwrites() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mine = "# my own repository settings\nroles = [\"timesync\"]\n";
    std::fs::write(dir.join("driftless.toml"), mine).unwrap();
    std::fs::create_dir_all(dir.join("roles/timesync")).unwrap();
    let my_role = "description = \"mine\"\n";
    std::fs::write(dir.join("roles/timesync/role.toml"), my_role).unwrap();
    std::fs::write(dir.join("notes.txt"), "untracked\n").unwrap();

    let run = init(&[s(dir), "--host", "web1", "--force"]).ok();
    assert!(
        run.stdout
            .contains("kept     driftless.toml (exists; not overwritten)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("kept     roles/timesync/role.toml"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("created  hosts/web1.toml"),
        "{}",
        run.stdout
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("driftless.toml")).unwrap(),
        mine
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("roles/timesync/role.toml")).unwrap(),
        my_role
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "untracked\n"
    );
    assert!(dir.join("roles/cron-job/files/site-jobs.tera").is_file());
    // The commit holds the scaffold's paths as they are on disk; the user's
    // other files stay untracked.
    assert_eq!(git(dir, &["show", "HEAD:driftless.toml"]), mine.trim_end());
    assert_eq!(git(dir, &["status", "--porcelain"]), "?? notes.txt");

    // Again, into the repository it made: nothing changes, git is left alone.
    std::fs::remove_file(dir.join("README.md")).unwrap();
    let before_head = git(dir, &["rev-parse", "HEAD"]);
    let run = init(&[s(dir), "--host", "web1", "--force"]).ok();
    assert!(run.stdout.contains("created  README.md"), "{}", run.stdout);
    assert!(
        run.stdout.contains(".git exists: left alone"),
        "{}",
        run.stdout
    );
    assert_eq!(git(dir, &["rev-parse", "HEAD"]), before_head);
    assert_eq!(
        std::fs::read_to_string(dir.join("driftless.toml")).unwrap(),
        mine
    );
}
