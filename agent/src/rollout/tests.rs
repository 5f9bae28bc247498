use std::collections::{BTreeMap, BTreeSet};

use super::decide::{bucket, progress, wave_of, BUCKETS};
use super::policy::{parse, Select, Wave};
use super::*;

const C: &str = "c0ffee0000000000000000000000000000000000";
const OLD: &str = "0ld0000000000000000000000000000000000000";

fn policy(text: &str) -> Policy {
    match parse("driftless.toml", text) {
        Ok(Some(p)) => p,
        other => panic!("{other:?}"),
    }
}

fn err(text: &str) -> String {
    match parse("driftless.toml", text) {
        Err(e) => e,
        other => panic!("expected an error for\n{text}\ngot {other:?}"),
    }
}

const THREE_WAVES: &str = r#"
roles = ["x"]
[rollout]
max_concurrent = 2
max_failures = 1

[[rollout.waves]]
name = "canary"
labels = { canary = "yes" }
min_healthy = 1
bake = "60s"

[[rollout.waves]]
name = "early"
percent = 10
min_healthy = 2
bake = "30s"

[[rollout.waves]]
name = "rest"
percent = 100
"#;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Host names that land in wave `w` of `p` (no labels).
fn names_in(p: &Policy, w: usize, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("host-{i}"))
        .filter(|h| wave_of(p, h, &BTreeMap::new()) == Some(w))
        .take(n)
        .collect()
}

fn report(host: &str, commit: Option<&str>, healthy: bool, since: i64) -> Report {
    Report {
        host: host.into(),
        group: "g".into(),
        labels: BTreeMap::new(),
        commit: commit.map(str::to_string),
        healthy,
        since: Some(since),
    }
}

#[test]
fn a_policy_parses_with_defaults() {
    let p = policy(THREE_WAVES);
    assert_eq!(p.max_concurrent, 2);
    assert_eq!(p.waves.len(), 3);
    assert_eq!(
        p.waves[0],
        Wave {
            name: "canary".into(),
            select: Select::Labels(labels(&[("canary", "yes")])),
            bake: 60,
            min_healthy: 1,
        }
    );
    assert_eq!(p.waves[2].min_healthy, 1);
    assert_eq!(p.waves[2].bake, 0);
    let p = policy("[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\n");
    assert_eq!((p.max_concurrent, p.max_failures), (1, 1));
    assert_eq!(parse("driftless.toml", "roles = []\n"), Ok(None));
}

#[test]
fn invalid_policies_name_file_line_key_and_fix() {
    // (policy, what the message must contain)
    let table: &[(&str, &[&str])] = &[
        (
            "[rollout]\nmax_concurent = 2\n",
            &["driftless.toml:2:1", "did you mean `max_concurrent`?"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercnt = 10\n",
            &["driftless.toml:4:1", "did you mean `percent`?"],
        ),
        (
            "[rollout]\nmax_concurrent = 0\n[[rollout.waves]]\nname = \"a\"\npercent = 100\n",
            &["driftless.toml:2: rollout.max_concurrent: 0 is not allowed"],
        ),
        (
            "[rollout]\nmax_failures = -1\n[[rollout.waves]]\nname = \"a\"\npercent = 100\n",
            &["driftless.toml:2: rollout.max_failures"],
        ),
        ("[rollout]\n", &["rollout.waves: none"]),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 50\n",
            &["no wave takes percent = 100"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 30\n[[rollout.waves]]\nname = \"b\"\npercent = 10\n[[rollout.waves]]\nname = \"c\"\npercent = 100\n",
            &["driftless.toml:7: rollout.waves[1].percent: 10 is not larger than the previous percentage wave's 30"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 101\n",
            &["driftless.toml:4: rollout.waves[0].percent: 101 is not a percentage"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 0\n",
            &["rollout.waves[0].percent: 0 is not a percentage"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 100\n[[rollout.waves]]\nname = \"b\"\nlabels = { x = \"y\" }\n",
            &["driftless.toml:5: rollout.waves[1] (\"b\"): no host can reach this wave"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\nlabels = { x = \"y\" }\npercent = 10\n[[rollout.waves]]\nname = \"b\"\npercent = 100\n",
            &["sets both `labels` and `percent`"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\n[[rollout.waves]]\nname = \"b\"\npercent = 100\n",
            &["driftless.toml:2: rollout.waves[0] (\"a\"): selects no hosts"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\nlabels = {}\n[[rollout.waves]]\nname = \"b\"\npercent = 100\n",
            &["rollout.waves[0].labels: empty"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 10\n[[rollout.waves]]\nname = \"a\"\npercent = 100\n",
            &["rollout.waves[1].name: \"a\" names two waves"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 100\nbake = \"soon\"\n",
            &["driftless.toml:5: rollout.waves[0].bake: \"soon\" is not a duration"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 10\nmin_healthy = 0\nbake = \"1m\"\n[[rollout.waves]]\nname = \"b\"\npercent = 100\n",
            &["rollout.waves[0].bake: the bake time counts from the min_healthy-th"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"\"\npercent = 100\n",
            &["rollout.waves[0].name: empty"],
        ),
        (
            "[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = \"10\"\n",
            &["driftless.toml:4", "percent"],
        ),
    ];
    for (text, wants) in table {
        let e = err(text);
        for want in *wants {
            assert!(e.contains(want), "for\n{text}\nwant {want:?} in:\n{e}");
        }
    }
    // Every problem at once, one per line.
    let e = err("[rollout]\nmax_concurrent = 0\n[[rollout.waves]]\nname = \"a\"\npercent = 0\n");
    assert!(e.lines().count() >= 3, "{e}");
}

#[test]
fn the_repository_loader_checks_the_rollout_section() {
    use crate::desired::snapshot::Snapshot;
    let mut snap = Snapshot::new();
    snap.insert_file(
        "driftless.toml",
        b"[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 50\n".to_vec(),
        false,
    );
    snap.insert_file("hosts/default.toml", Vec::new(), false);
    let opts = crate::desired::load::LoadOptions {
        allowed_roots: vec![],
        reserved: vec![],
    };
    let e = crate::desired::load::load_host(&snap, "h", &opts)
        .err()
        .map(|d| format!("{d}"))
        .unwrap_or_default();
    assert!(e.contains("no wave takes percent = 100"), "{e}");
}

#[test]
fn buckets_are_stable_and_percent_waves_get_their_share() {
    // Fixed values: a change of the hash would reshuffle every fleet's
    // waves in the middle of rollouts.
    // (Computed independently: SHA-256 of "driftless-rollout\0" + name,
    // first 8 bytes big-endian, modulo 10000.)
    let known: Vec<u64> = ["web1", "web2", "db1"].iter().map(|h| bucket(h)).collect();
    assert_eq!(known, vec![340, 569, 2595]);
    assert!((0..1000).all(|i| bucket(&format!("h{i}")) < BUCKETS));
    let p = policy(THREE_WAVES);
    let mut counts = [0usize; 3];
    let n = 20_000;
    for i in 0..n {
        let w = wave_of(&p, &format!("node-{i:05}.example.org"), &BTreeMap::new());
        counts[w.unwrap()] += 1;
    }
    assert_eq!(counts[0], 0, "no labels: nobody is a canary");
    let early = counts[1] as f64 / n as f64;
    assert!((0.09..0.11).contains(&early), "{early}");
    // Label waves come first, whatever the hash says.
    let canary = labels(&[("canary", "yes"), ("zone", "a")]);
    for i in 0..100 {
        assert_eq!(wave_of(&p, &format!("h{i}"), &canary), Some(0));
    }
    // A partial label match is no match.
    assert_ne!(
        wave_of(&p, "h", &labels(&[("canary", "no")])),
        Some(0),
        "label values must match"
    );
}

#[test]
fn decisions_table() {
    let p = policy(THREE_WAVES);
    let early = names_in(&p, 1, 3);
    let rest = names_in(&p, 2, 3);
    let canary_labels = labels(&[("canary", "yes")]);
    let none = BTreeMap::new();
    let mut canary_report = report("canary1", Some(C), true, 1000);
    canary_report.labels = canary_labels.clone();
    let early_healthy = |n: usize, since: i64| -> Vec<Report> {
        early
            .iter()
            .take(n)
            .map(|h| report(h, Some(C), true, since))
            .collect()
    };
    struct Case {
        name: &'static str,
        host: String,
        labels: BTreeMap<String, String>,
        current: Option<&'static str>,
        reports: Vec<Report>,
        bad: Vec<&'static str>,
        permits: Vec<&'static str>,
        now: i64,
        want: &'static str,
        reason: &'static str,
    }
    let case = |name, host: &str, labels: &BTreeMap<String, String>| Case {
        name,
        host: host.into(),
        labels: labels.clone(),
        current: Some(OLD),
        reports: Vec::new(),
        bad: Vec::new(),
        permits: Vec::new(),
        now: 2000,
        want: "apply",
        reason: "",
    };
    let cases = vec![
        Case {
            reason: "may apply",
            ..case("a canary goes first", "canary1", &canary_labels)
        },
        Case {
            current: None,
            reason: "may apply",
            ..case("a first sync is a rollout too", "canary1", &canary_labels)
        },
        Case {
            want: "wait",
            reason: "0 of 1 healthy",
            ..case("early waits for the canary", &early[0], &none)
        },
        Case {
            reports: vec![Report {
                healthy: false,
                ..canary_report.clone()
            }],
            want: "wait",
            reason: "0 of 1 healthy",
            ..case("an unhealthy canary does not count", &early[0], &none)
        },
        Case {
            reports: vec![canary_report.clone()],
            now: 1030,
            want: "wait",
            reason: "to bake until",
            ..case("early waits for the bake", &early[0], &none)
        },
        Case {
            reports: vec![canary_report.clone()],
            now: 1060,
            reason: "may apply",
            ..case("after the bake, early may go", &early[0], &none)
        },
        Case {
            reports: {
                let mut r = vec![canary_report.clone()];
                r.extend(early_healthy(1, 1100));
                r
            },
            now: 5000,
            want: "wait",
            reason: "1 of 2 healthy",
            ..case("rest waits for two early reports", &rest[0], &none)
        },
        Case {
            reports: {
                let mut r = vec![canary_report.clone()];
                r.extend(early_healthy(1, 1100));
                r.push(report(&early[1], Some(C), true, 1200));
                r
            },
            now: 1229,
            want: "wait",
            reason: "bake",
            ..case(
                "bake counts from the min_healthy-th report",
                &rest[0],
                &none,
            )
        },
        Case {
            reports: {
                let mut r = vec![canary_report.clone()];
                r.extend(early_healthy(1, 1100));
                r.push(report(&early[1], Some(C), true, 1200));
                r
            },
            now: 1230,
            reason: "may apply",
            ..case("rest goes once early baked", &rest[0], &none)
        },
        Case {
            reports: vec![canary_report.clone()],
            now: 1060,
            permits: vec!["x", "y"],
            want: "wait",
            reason: "all 2 permit(s) taken (by x, y)",
            ..case("permits exhausted", &early[0], &none)
        },
        Case {
            reports: vec![canary_report.clone()],
            now: 1060,
            permits: vec!["x", "EARLY0"],
            reason: "may apply",
            ..case("a held permit counts as mine", &early[0], &none)
        },
        Case {
            bad: vec!["canary1"],
            want: "halt",
            reason: "halted: 1 host(s) reverted it",
            ..case("a revert halts", &rest[0], &none)
        },
        Case {
            bad: vec!["canary1"],
            want: "halt",
            reason: "halted",
            ..case(
                "a revert halts the canary wave too",
                "canary2",
                &canary_labels,
            )
        },
        Case {
            current: Some(C),
            reason: "already on",
            ..case("a host already on the commit converges", &rest[0], &none)
        },
    ];
    for c in cases {
        let mut view = FleetView {
            reports: c.reports.clone(),
            ..Default::default()
        };
        for h in &c.bad {
            view.bad
                .entry(C.into())
                .or_default()
                .insert(h.to_string(), "check failed".into());
        }
        let permits: BTreeSet<String> = c
            .permits
            .iter()
            .map(|p| {
                if *p == "EARLY0" {
                    early[0].clone()
                } else {
                    p.to_string()
                }
            })
            .collect();
        if !permits.is_empty() {
            view.permits.insert("g".into(), permits);
        }
        let host = ThisHost {
            name: &c.host,
            group: "g",
            labels: &c.labels,
            current: c.current,
            tz: &jiff::tz::TimeZone::UTC,
        };
        let d = decide(&p, &host, &view, C, c.now);
        let kind = match d {
            Decision::Apply { .. } => "apply",
            Decision::Wait { .. } => "wait",
            Decision::Halt { .. } => "halt",
        };
        assert_eq!(kind, c.want, "{}: {d:?}", c.name);
        assert!(d.reason().contains(c.reason), "{}: {d:?}", c.name);
    }
}

#[test]
fn max_failures_above_one_tolerates_fewer_reverts() {
    let mut p = policy(THREE_WAVES);
    p.max_failures = 2;
    let rest = names_in(&p, 2, 1);
    let mut view = FleetView::default();
    view.bad
        .entry(C.into())
        .or_default()
        .insert("a".into(), "x".into());
    let none = BTreeMap::new();
    let host = ThisHost {
        name: &rest[0],
        group: "g",
        labels: &none,
        current: Some(OLD),
        tz: &jiff::tz::TimeZone::UTC,
    };
    assert!(matches!(
        decide(&p, &host, &view, C, 0),
        Decision::Wait { .. }
    ));
    view.bad
        .entry(C.into())
        .or_default()
        .insert("b".into(), "x".into());
    assert!(matches!(
        decide(&p, &host, &view, C, 0),
        Decision::Halt { .. }
    ));
    // Another commit is not affected.
    assert!(!matches!(
        decide(&p, &host, &view, OLD, 0),
        Decision::Halt { .. }
    ));
}

#[test]
fn progress_counts_live_hosts_per_wave() {
    let p = policy(THREE_WAVES);
    let early = names_in(&p, 1, 3);
    let view = FleetView {
        reports: vec![
            report(&early[0], Some(C), true, 10),
            report(&early[1], Some(C), false, 20),
            report(&early[2], Some(OLD), true, 5),
        ],
        ..Default::default()
    };
    let pr = progress(&p, &view, C);
    assert_eq!(pr[1].hosts, 3);
    assert_eq!(pr[1].applied, 2);
    assert_eq!(pr[1].healthy, 1);
    assert_eq!(pr[1].healthy_enough_at, None, "min_healthy is 2");
}

/// A tiny deterministic generator (no dependency, same sequence
/// everywhere).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// A simulated fleet: hosts ask in a random order each tick; an `Apply`
/// takes a permit if one is free (as the store's transaction would), the
/// apply takes `apply_ticks`, and then the host reports healthy (or
/// reverts, if `broken` says so) and frees its permit.
fn simulate(seed: u64, hosts: usize, broken: impl Fn(&str) -> bool) -> Simulated {
    simulate_with(THREE_WAVES, seed, hosts, broken)
}

fn simulate_with(text: &str, seed: u64, hosts: usize, broken: impl Fn(&str) -> bool) -> Simulated {
    let p = policy(text);
    let mut rng = Lcg(seed);
    let names: Vec<String> = (0..hosts).map(|i| format!("sim-{seed}-{i}")).collect();
    let canaries: BTreeSet<usize> = [0usize, 1].into_iter().collect();
    let label_of = |i: usize| {
        if canaries.contains(&i) {
            labels(&[("canary", "yes")])
        } else {
            BTreeMap::new()
        }
    };
    let mut current: Vec<Option<String>> = vec![Some(OLD.into()); hosts];
    let mut busy: Vec<Option<u64>> = vec![None; hosts];
    let mut view = FleetView::default();
    let mut out = Simulated::default();
    let apply_ticks = 3;
    for tick in 0..2000u64 {
        let now = 1_000_000 + tick as i64 * 5;
        // Finish applies.
        for i in 0..hosts {
            if busy[i].is_some_and(|t| tick >= t + apply_ticks) {
                busy[i] = None;
                if let Some(set) = view.permits.get_mut("g") {
                    set.remove(&names[i]);
                }
                if broken(&names[i]) {
                    view.bad
                        .entry(C.into())
                        .or_default()
                        .insert(names[i].clone(), "check failed".into());
                } else {
                    current[i] = Some(C.into());
                    out.applied_at.insert(names[i].clone(), now);
                }
            }
        }
        view.reports = (0..hosts)
            .map(|i| Report {
                host: names[i].clone(),
                group: "g".into(),
                labels: label_of(i),
                commit: current[i].clone(),
                healthy: true,
                since: out.applied_at.get(&names[i]).copied(),
            })
            .collect();
        let mut order: Vec<usize> = (0..hosts).collect();
        rng.shuffle(&mut order);
        for i in order {
            if busy[i].is_some() || current[i].as_deref() == Some(C) {
                continue;
            }
            let l = label_of(i);
            let host = ThisHost {
                name: &names[i],
                group: "g",
                labels: &l,
                current: current[i].as_deref(),
                tz: &jiff::tz::TimeZone::UTC,
            };
            match decide(&p, &host, &view, C, now) {
                Decision::Apply { wave, .. } => {
                    let set = view.permits.entry("g".into()).or_default();
                    if set.len() < p.max_concurrent as usize {
                        set.insert(names[i].clone());
                        busy[i] = Some(tick);
                        out.started.push((names[i].clone(), wave, now));
                    }
                }
                Decision::Halt { .. } => {
                    out.halted.insert(names[i].clone());
                }
                Decision::Wait { .. } => {}
            }
            let held = view.permits.get("g").map_or(0, BTreeSet::len);
            out.max_permits = out.max_permits.max(held);
        }
        if (0..hosts).all(|i| current[i].as_deref() == Some(C)) {
            out.done_at = Some(tick);
            break;
        }
    }
    out.policy = Some(p);
    out
}

#[derive(Default)]
struct Simulated {
    policy: Option<Policy>,
    /// (host, wave, time) in the order applies started.
    started: Vec<(String, usize, i64)>,
    applied_at: BTreeMap<String, i64>,
    halted: BTreeSet<String>,
    max_permits: usize,
    done_at: Option<u64>,
}

#[test]
fn property_many_hosts_roll_out_wave_by_wave_within_the_permits() {
    for seed in 1..=12u64 {
        let hosts = 40 + (seed as usize * 7) % 60;
        let s = simulate(seed, hosts, |_| false);
        let p = s.policy.as_ref().unwrap();
        assert!(s.done_at.is_some(), "seed {seed}: the rollout finished");
        assert_eq!(
            s.started.len(),
            hosts,
            "seed {seed}: each host applied once"
        );
        assert!(s.max_permits <= 2, "seed {seed}: {} permits", s.max_permits);
        // Waves start in order: no host of wave k started before wave k-1
        // had min_healthy healthy reports that baked.
        for (host, wave, t) in &s.started {
            for (j, w) in p.waves.iter().enumerate().take(*wave) {
                let mut healthy: Vec<i64> = s
                    .started
                    .iter()
                    .filter(|(_, wj, _)| *wj == j)
                    .filter_map(|(h, _, _)| s.applied_at.get(h).copied())
                    .filter(|at| at <= t)
                    .collect();
                healthy.sort_unstable();
                let need = w.min_healthy as usize;
                assert!(
                    healthy.len() >= need,
                    "seed {seed}: {host} (wave {wave}) started at {t} with wave {j} at {}/{need}",
                    healthy.len()
                );
                if need > 0 {
                    assert!(
                        healthy[need - 1] + w.bake as i64 <= *t,
                        "seed {seed}: {host} started before wave {j} baked"
                    );
                }
            }
        }
    }
}

#[test]
fn property_a_failing_canary_halts_everyone_else() {
    for seed in 20..=30u64 {
        let hosts = 50;
        let s = simulate(seed, hosts, |h| h.ends_with("-0"));
        assert!(s.done_at.is_none(), "seed {seed}: must not finish");
        // Only canaries (wave 0) ever started; nobody outside the canary
        // wave applied the commit.
        for (host, wave, _) in &s.started {
            assert_eq!(*wave, 0, "seed {seed}: {host} started in wave {wave}");
        }
        assert!(
            s.halted.len() >= hosts - 2,
            "seed {seed}: {} halted",
            s.halted.len()
        );
    }
}

#[test]
fn the_default_policy_is_one_wave_one_at_a_time() {
    let p = Policy::default_policy();
    assert_eq!(p.max_concurrent, 1);
    let none = BTreeMap::new();
    let host = ThisHost {
        name: "a",
        group: "g",
        labels: &none,
        current: None,
        tz: &jiff::tz::TimeZone::UTC,
    };
    assert!(matches!(
        decide(&p, &host, &FleetView::default(), C, 0),
        Decision::Apply { wave: 0, .. }
    ));
}

const WINDOWED: &str = r#"
roles = ["x"]
[rollout]
max_concurrent = 2

[[rollout.waves]]
name = "canary"
labels = { canary = "yes" }
min_healthy = 1
bake = "60s"

[[rollout.waves]]
name = "rest"
percent = 100

[[rollout.windows]]
calendar = "*:00/10:00 UTC"
length = "2m"
"#;

#[test]
fn windows_parse_with_their_groups_and_lengths() {
    let p = policy(
        "[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\n\
         [[rollout.windows]]\ngroups = [\"db\"]\ncalendar = \"Mon..Fri 22:00\"\nlength = \"8h\"\n\
         [[rollout.windows]]\ncalendar = \"Sat,Sun 02:00 UTC\"\nlength = \"2h\"\n",
    );
    assert_eq!(p.windows.len(), 2);
    assert!(p.windows[0].holds_for("db") && !p.windows[0].holds_for("web"));
    assert!(p.windows[1].holds_for("web"));
    assert_eq!(p.windows[0].window.length, 8 * 3600);
    assert_eq!(
        p.windows[1].window.calendar.to_string(),
        "Sat,Sun 02:00 UTC"
    );
    // Stored in etcd and read back by `fleet status` and other hosts.
    let j = serde_json::to_string(&p).unwrap();
    assert!(
        j.contains(r#""windows":[{"groups":["db"],"calendar":"Mon..Fri 22:00","length":28800}"#),
        "{j}"
    );
    assert_eq!(serde_json::from_str::<Policy>(&j).unwrap(), p);
    // A policy without windows serialises as before windows existed.
    let plain = serde_json::to_string(&policy(THREE_WAVES)).unwrap();
    assert!(!plain.contains("windows"), "{plain}");
}

#[test]
fn bad_windows_name_the_line_and_key() {
    let base = "[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\n[[rollout.windows]]\n";
    for (tail, want) in [
        ("calendar = \"Fri..Mon 22:00\"\nlength = \"8h\"\n", "driftless.toml:6: rollout.windows[0].calendar: \"Fri..Mon\": a weekday range runs forwards"),
        ("calendar = \"22:00\"\nlength = \"0s\"\n", "driftless.toml:7: rollout.windows[0].length: \"0s\" is shorter than a second"),
        ("calendar = \"22:00\"\nlength = \"soon\"\n", "driftless.toml:7: rollout.windows[0].length"),
        ("groups = []\ncalendar = \"22:00\"\nlength = \"1h\"\n", "rollout.windows[0].groups: empty"),
        ("calendar = \"22:00\"\n", "missing field `length`"),
        ("calendar = \"22:00\"\nlength = \"1h\"\nstart = \"x\"\n", "unknown field `start`"),
    ] {
        let e = err(&format!("{base}{tail}"));
        assert!(e.contains(want), "{tail:?}: {e}");
    }
}

fn at_utc(s: &str) -> i64 {
    let dt: jiff::civil::DateTime = s.parse().unwrap();
    jiff::tz::TimeZone::UTC
        .to_ambiguous_timestamp(dt)
        .compatible()
        .unwrap()
        .as_second()
}

#[test]
fn outside_its_window_a_group_waits_and_says_when_it_opens() {
    let p = policy(
        "[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n\
         [[rollout.windows]]\ngroups = [\"db\"]\ncalendar = \"Mon..Fri 22:00\"\nlength = \"8h\"\n",
    );
    let none = BTreeMap::new();
    let utc = jiff::tz::TimeZone::UTC;
    let host = |group| ThisHost {
        name: "h",
        group,
        labels: &none,
        current: Some(OLD),
        tz: &utc,
    };
    let view = FleetView::default();
    let friday_noon = at_utc("2026-12-04 12:00:00");
    match decide(&p, &host("db"), &view, C, friday_noon) {
        Decision::Wait { reason, .. } => assert!(
            reason.contains(
                "group \"db\" is outside its maintenance window (\"Mon..Fri 22:00\" for 8h)"
            ) && reason.contains("the next opens at 2026-12-04T22:00:00Z (36000s from now)"),
            "{reason}"
        ),
        d => panic!("{d:?}"),
    }
    // Other groups have no window.
    assert!(matches!(
        decide(&p, &host("web"), &view, C, friday_noon),
        Decision::Apply { .. }
    ));
    // Inside: Friday night, and Saturday 05:59 (Friday's window).
    for t in ["2026-12-04 22:00:00", "2026-12-05 05:59:59"] {
        assert!(
            matches!(
                decide(&p, &host("db"), &view, C, at_utc(t)),
                Decision::Apply { .. }
            ),
            "{t}"
        );
    }
    assert!(matches!(
        decide(&p, &host("db"), &view, C, at_utc("2026-12-05 06:00:00")),
        Decision::Wait { .. }
    ));
    // A host already on the commit converges (drift repair) at any time.
    let on = ThisHost {
        current: Some(C),
        ..host("db")
    };
    assert!(matches!(
        decide(&p, &on, &view, C, friday_noon),
        Decision::Apply { .. }
    ));
    // The window is read in the host's time zone: 22:00 in Tokyo is
    // 13:00 UTC, so at 14:00 UTC on a Friday a Tokyo host is inside.
    let tokyo = jiff::tz::TimeZone::get("Asia/Tokyo").unwrap();
    let far = ThisHost {
        tz: &tokyo,
        ..host("db")
    };
    assert!(matches!(
        decide(&p, &far, &view, C, at_utc("2026-12-04 14:00:00")),
        Decision::Apply { .. }
    ));
}

#[test]
fn a_suspension_holds_its_group_or_every_group_but_not_a_halt() {
    let p = policy(THREE_WAVES);
    let utc = jiff::tz::TimeZone::UTC;
    let canary = labels(&[("canary", "yes")]);
    let host = |group| ThisHost {
        name: "c",
        group,
        labels: &canary,
        current: Some(OLD),
        tz: &utc,
    };
    let mut view = FleetView::default();
    view.suspended.insert(
        "db".into(),
        decide::Suspension {
            by: "ops@admin1".into(),
            reason: "db migration".into(),
            since: 1_000,
        },
    );
    match decide(&p, &host("db"), &view, C, 2_000) {
        Decision::Wait { reason, .. } => assert!(
            reason.contains("suspended for group \"db\" by ops@admin1")
                && reason.contains("(db migration)")
                && reason.contains("`driftless resume --group db`"),
            "{reason}"
        ),
        d => panic!("{d:?}"),
    }
    assert!(matches!(
        decide(&p, &host("web"), &view, C, 2_000),
        Decision::Apply { .. }
    ));
    view.suspended.insert(
        decide::ALL_GROUPS.into(),
        decide::Suspension {
            by: "ops@admin1".into(),
            reason: String::new(),
            since: 1_000,
        },
    );
    match decide(&p, &host("web"), &view, C, 2_000) {
        Decision::Wait { reason, .. } => {
            assert!(reason.contains("suspended for every group"), "{reason}");
            assert!(reason.contains("`driftless resume`"), "{reason}");
        }
        d => panic!("{d:?}"),
    }
    // A host on the commit still converges; a halted commit stays halted.
    let on = ThisHost {
        current: Some(C),
        ..host("web")
    };
    assert!(matches!(
        decide(&p, &on, &view, C, 2_000),
        Decision::Apply { .. }
    ));
    view.bad
        .entry(C.into())
        .or_default()
        .insert("x".into(), "check".into());
    assert!(matches!(
        decide(&p, &host("web"), &view, C, 2_000),
        Decision::Halt { .. }
    ));
}

#[test]
fn property_no_host_starts_outside_the_window_and_the_rollout_still_finishes() {
    let p = policy(WINDOWED);
    let utc = jiff::tz::TimeZone::UTC;
    for seed in 40..=42u64 {
        let s = simulate_with(WINDOWED, seed, 40, |_| false);
        assert!(s.done_at.is_some(), "seed {seed}: the rollout finished");
        assert_eq!(s.started.len(), 40, "seed {seed}");
        for (host, _, t) in &s.started {
            assert!(
                decide::outside_window(&p, "g", *t, &utc).is_none(),
                "seed {seed}: {host} started at {t}, outside the window"
            );
        }
        // It took more than one window: the closing one made hosts wait.
        let first = s.started.iter().map(|(_, _, t)| *t).min().unwrap();
        let last = s.started.iter().map(|(_, _, t)| *t).max().unwrap();
        assert!(
            last - first > 600,
            "seed {seed}: all within {}s",
            last - first
        );
    }
}
