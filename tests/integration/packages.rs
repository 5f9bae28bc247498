//! `[[packages]]` under a `--root` prefix: read from the prefix's dpkg
//! database, never changed (the plan says so), and validated with the
//! entry's line. Installing, repairing and reverting with the real apt is
//! the nspawn e2e suite's (e2e_22).

use crate::support::*;

fn prefix_with_dpkg(host: &Host) {
    let dpkg = host.path("/var/lib/dpkg");
    std::fs::create_dir_all(dpkg.join("info")).unwrap();
    std::fs::create_dir_all(dpkg.join("updates")).unwrap();
    std::fs::write(
        dpkg.join("status"),
        "Package: demo\nStatus: install ok installed\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@example.org>\nDescription: x\n\n",
    )
    .unwrap();
}

#[test]
fn packages_under_a_prefix_are_read_and_never_changed() {
    let host = Host::new("h");
    prefix_with_dpkg(&host);
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        "[[packages]]\nname = \"demo\"\nversion = \"2.0\"\n\n[[packages]]\nname = \"nginx-light\"\n",
    );
    r.commit("v1");
    let status = std::fs::read(host.path("/var/lib/dpkg/status")).unwrap();
    let plan = host.run(r.path(), &["plan"]).ok().stdout;
    assert!(
        plan.contains("note: [[packages]] are read but not changed under --root or without root"),
        "{plan}"
    );
    assert!(!plan.contains("install"), "{plan}");
    let run = host.run(r.path(), &["sync", "--once"]).ok();
    assert!(!run.stderr.contains("apt"), "{}", run.stderr);
    assert_eq!(
        std::fs::read(host.path("/var/lib/dpkg/status")).unwrap(),
        status
    );
}

#[test]
fn bad_package_declarations_name_their_line() {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"a\", \"b\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/a/role.toml",
        "[[packages]]\nname = \"--purge\"\n\n\
         [[packages]]\nname = \"telnet\"\nstate = \"absent\"\n\n\
         [[packages]]\nname = \"demo\"\nversion = \"v1\"\n\n\
         [[packages]]\nname = \"nginx\"\nstate = \"gone\"\n",
    );
    r.write("roles/b/role.toml", "[[packages]]\nname = \"telnet\"\n");
    r.commit("bad");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(3), "{out}");
    for want in [
        "roles/a/role.toml:1 packages[0]: key `name`: \"--purge\" is not a Debian package name",
        "roles/a/role.toml:8 packages[2]: key `version`: \"v1\" is not a Debian version",
        "roles/a/role.toml:12 packages[3]: key `state`: \"gone\" is not \"present\" or \"absent\"",
        "roles/b/role.toml:1 packages[0]: package telnet is present here but absent in roles/a/role.toml:4 packages[1]; remove one of the two",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    // `reboot` takes a boolean, and nothing else.
    r.write("roles/a/role.toml", "");
    r.write(
        "roles/b/role.toml",
        "[[packages]]\nname = \"x1\"\nreboot = \"yes\"\n",
    );
    r.commit("reboot as a string");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("roles/b/role.toml:3"), "{out}");
    assert!(out.contains("expected a boolean"), "{out}");
    r.write(
        "roles/b/role.toml",
        "[[packages]]\nname = \"x1\"\nreboot = true\n",
    );
    r.commit("reboot");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
}
