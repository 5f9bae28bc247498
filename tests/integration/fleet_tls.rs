//! The fleet's etcd over TLS: client certificates, etcd users, and the
//! refusals that keep a key or password from being used when it leaked
//! (issue 17). A real etcd with `--client-cert-auth` or `auth enable`,
//! certificates made here with the openssl command.

#![cfg(feature = "etcd")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use etcd_client::{Certificate, ConnectOptions, Identity, Permission, TlsOptions};

use super::fleet::{etcd_or_skip, repo_with, round, Agent, Etcd};

/// Runs openssl; the test fails naming the command if it does.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl; tests/install-prereqs installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1, and client certificates
/// `names` (`<name>.pem` / `<name>.key`), all in `dir`, keys mode 0600.
fn pki(dir: &Path, names: &[&str]) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=driftless test CA",
        ],
    );
    let leaf = |name: &str, ext: &str| {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        std::fs::set_permissions(
            dir.join(format!("{name}.key")),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    };
    leaf(
        "server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    for n in names {
        leaf(n, "extendedKeyUsage=clientAuth\n");
    }
}

fn tls_opts(dir: &Path, client: Option<&str>) -> ConnectOptions {
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(
        std::fs::read(dir.join("ca.pem")).unwrap(),
    ));
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(dir.join(format!("{c}.pem"))).unwrap(),
            std::fs::read(dir.join(format!("{c}.key"))).unwrap(),
        ));
    }
    ConnectOptions::new().with_tls(tls)
}

fn tls_etcd(client_cert_auth: bool, clients: &[&str], flags: &[&str]) -> Option<Etcd> {
    // A missing etcd is reported (and counted) by etcd_or_skip.
    drop(etcd_or_skip()?);
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), clients);
    let d = dir.path().display().to_string();
    let mut extra = vec![
        format!("--cert-file={d}/server.pem"),
        format!("--key-file={d}/server.key"),
    ];
    extra.extend(flags.iter().map(|f| f.to_string()));
    if client_cert_auth {
        // (etcd 3.4 with a trusted CA but without client-cert-auth cannot
        // reach its own gateway: the two go together here.)
        extra.push(format!("--trusted-ca-file={d}/ca.pem"));
        extra.push("--client-cert-auth".into());
    }
    let opts = tls_opts(dir.path(), client_cert_auth.then_some("tester"));
    let etcd = Etcd::start_with(dir, "https", extra, Some(opts));
    assert!(etcd.is_some(), "etcd with TLS did not start");
    etcd
}

#[test]
fn agents_reach_etcd_over_tls_with_client_certificates_and_refuse_a_readable_key() {
    let Some(etcd) = tls_etcd(true, &["tester", "h0", "h1"], &[]) else {
        return;
    };
    let pki = etcd.dir.path();
    let policy = "[rollout]\nmax_concurrent = 2\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";
    let repo = repo_with(policy, "good v1\n");
    repo.commit("v1");
    let keys = |name: &str| {
        format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.join("ca.pem").display().to_string(),
            pki.join(format!("{name}.pem")).display().to_string(),
            pki.join(format!("{name}.key")).display().to_string(),
        )
    };
    let agents: Vec<Agent> = ["h0", "h1"]
        .iter()
        .map(|n| Agent::with_fleet_keys(n, repo.path(), &etcd, "g", "", "10s", &keys(n)))
        .collect();
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
    }
    for a in &agents {
        assert_eq!(a.content().as_deref(), Some("good v1\n"), "{}", a.name);
    }
    assert_eq!(etcd.keys("/t/hosts/"), vec!["/t/hosts/h0", "/t/hosts/h1"]);
    let st = agents[0].cmd(&["fleet", "status"]).output().unwrap();
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(st.contains("2 live host(s)"), "{st}");

    // Without a client certificate etcd refuses the connection: the host
    // waits (on_unreachable = "wait") and says why.
    let repo2 = repo_with(policy, "good v1\n");
    repo2.commit("v1");
    let no_cert = Agent::with_fleet_keys(
        "h2",
        repo2.path(),
        &etcd,
        "g",
        "",
        "10s",
        &format!("ca_file = {:?}\n", pki.join("ca.pem").display().to_string()),
    );
    let out = no_cert.cmd(&["sync", "--once"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(no_cert.content().is_none(), "applied without etcd: {text}");
    assert!(text.contains("until etcd answers"), "{text}");

    // A key others can read is not used.
    std::fs::set_permissions(pki.join("h1.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agents[1].cmd(&["fleet", "status"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("fleet.key_file")
            && err.contains("h1.key is readable or writable by others (mode 0644)")
            && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn agents_authenticate_as_etcd_users_over_tls() {
    // Tokens live 2 s: the agent's run (a 3 s check) outlives its token,
    // and its closing writes must still land (etcd-client authenticates
    // only at connect; the agent reconnects).
    let Some(etcd) = tls_etcd(false, &[], &["--auth-token=simple", "--auth-token-ttl=2"]) else {
        return;
    };
    let pki = etcd.dir.path().to_path_buf();
    // Users: root (required by etcd), and "agent" allowed to read and
    // write under /t only.
    let mut c = etcd.client();
    etcd.rt.block_on(async {
        c.user_add("root", "rootpw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("fleet").await.unwrap();
        c.role_grant_permission("fleet", Permission::read_write("/t").with_prefix())
            .await
            .unwrap();
        c.user_add("agent", "s3cret-pw", None).await.unwrap();
        c.user_grant_role("agent", "fleet").await.unwrap();
        c.auth_enable().await.unwrap();
    });
    let policy = "[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";
    let repo = repo_with(policy, "good v1\n");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"slow\"\nretries = 1\ntimeout = \"10s\"\n\
         command = { argv = [\"/bin/sleep\", \"3\"] }\n",
    );
    repo.commit("v1");
    let password = |name: &str, pw: &str| {
        let p = pki.join(name);
        std::fs::write(&p, format!("{pw}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!(
            "ca_file = {:?}\nuser = \"agent\"\npassword_file = {:?}\n",
            pki.join("ca.pem").display().to_string(),
            p.display().to_string()
        )
    };
    let good = Agent::with_fleet_keys(
        "h0",
        repo.path(),
        &etcd,
        "g",
        "",
        "10s",
        &password("pw-good", "s3cret-pw"),
    );
    let out = good.cmd(&["sync", "--once"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(good.content().as_deref(), Some("good v1\n"), "{text}");
    assert!(!text.contains("cannot report this run"), "{text}");
    let status = etcd.rt.block_on(async {
        let mut c = etcd_client::Client::connect(
            [etcd.endpoint.as_str()],
            Some(tls_opts(&pki, None).with_user("root", "rootpw")),
        )
        .await
        .unwrap();
        c.get("/t/hosts/h0", None).await.unwrap().count()
    });
    assert_eq!(
        status, 1,
        "the status written after a token expired: {text}"
    );
    assert!(
        !text.contains("give the permit back"),
        "the permit went back on a new connection: {text}"
    );

    let bad = Agent::with_fleet_keys(
        "h1",
        repo.path(),
        &etcd,
        "g",
        "",
        "10s",
        &password("pw-bad", "wrong"),
    );
    let out = bad.cmd(&["sync", "--once"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        bad.content().is_none(),
        "applied with a wrong password: {text}"
    );
    assert!(text.contains("until etcd answers"), "{text}");
    assert!(
        !text.contains("wrong"),
        "the password reached the log: {text}"
    );

    // Over http://, a password is refused before anything is sent.
    let http = tempfile::tempdir().unwrap();
    let conf = http.path().join("agent.toml");
    std::fs::write(
        &conf,
        "source = \"/nonexistent\"\n[fleet]\nendpoints = [\"http://127.0.0.1:1\"]\nuser = \"agent\"\npassword_file = \"/etc/pw\"\n",
    )
    .unwrap();
    let out = Command::new(crate::support::BIN)
        .args(["fleet", "status", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("fleet.user: over http:// the password would cross the network in clear"),
        "{err}"
    );
}
