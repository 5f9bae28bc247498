#!/usr/bin/env python3
"""Markdown tables from fleet-sim's JSON documents (one per fleet size),
for bench/fleet-sim/run. Every number is one the simulator measured or a
ratio of two of them; derived rows say what they are derived from."""

import json
import sys

REAL_INTERVAL = 300.0  # the agent's default poll interval (5 min)

runs = [json.load(open(p)) for p in sys.argv[1:]]
runs.sort(key=lambda r: r["hosts"])


def phase(r, name):
    for p in r["phases"]:
        if p["phase"] == name:
            return p
    return None


def f(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def mmm(m, digits=1):
    if not m:
        return "–"
    return f"{f(m['min'], digits)} / {f(m['median'], digits)} / {f(m['max'], digits)}"


def row(label, values):
    print(f"| {label} | " + " | ".join(values) + " |")


def table(title, rows):
    print()
    print(f"**{title}**")
    print()
    print("| | " + " | ".join(f"{r['hosts']:,} hosts" for r in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for label, fn in rows:
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (TypeError, KeyError, ZeroDivisionError):
                vals.append("–")
        row(label, vals)


def short_error(e):
    """The gRPC message when there is one (the context before it names
    the endpoint and the key)."""
    if "message: " in e:
        return e.split("message: ", 1)[1].strip('"')[:150]
    return e[:150]


def errors(p):
    if not p or not p["errors"]:
        return "none"
    return "; ".join(f"{n}× {short_error(e)}" for e in sorted(p["errors"], key=lambda e: -p["errors"][e]) for n in [p["errors"][e]])


def effective_interval(r, name):
    """Per host, the wall time of the phase over the runs it completed."""
    p = phase(r, name)
    done = p["run_ms"]["n"] if p["run_ms"] else 0
    if done < r["hosts"]:
        return f"**{done:,} runs finished** by {r['hosts']:,} hosts in {f(p['wall_s'], 0)} s"
    return f"{f(p['wall_s'] * r['hosts'] / done)} s (nominal {f(p['nominal_interval_s'])} s)"


def per_interval(p, r, value):
    """`value` (a count over the phase) per poll interval of the simulation."""
    return value * (r["interval_s"] + r["splay_s"] / 2) / p["wall_s"]


r0 = runs[0]
print()
print(
    f"Settings: poll every {r0['interval_s']:g} s + up to {r0['splay_s']:g} s splay "
    f"(the agent's default is 5 min + 1 min: time compressed {REAL_INTERVAL / r0['interval_s']:.0f}×), "
    f"{r0['connections']} shared etcd connections, apply holds the permit {r0['apply_ms']} ms, "
    f"waves canary ({r0['canaries']} host, bake {r0['bake_s']} s) → 10% (bake {r0['bake_s']} s) → rest, "
    f"max_concurrent {r0['max_concurrent']}, rollout timeout {r0['rollout_timeout_s']:g} s."
)

table(
    "Connections: one per host, opened from this one process",
    [
        ("opened / failed", lambda r: f"{phase(r, 'connect_all')['connections']:,} / "
         f"{sum(phase(r, 'connect_all')['errors'].values())}"),
        ("time to open all (s)", lambda r: f(phase(r, "connect_all")["open_s"], 2)),
        ("etcd open fds, RSS (MB) with all open", lambda r: f"{phase(r, 'connect_all')['etcd_open_fds']:,.0f}, "
         f"{f(phase(r, 'connect_all')['etcd_rss_mb_all_open'], 0)}"),
    ],
)

table(
    "A run without a new commit (every host once, all at once; the first run, then the steady state)",
    [
        ("first run: runs/s", lambda r: f(phase(r, "register")["runs_per_s"], 0)),
        ("first run: etcd requests / writes (raft proposals) per run",
         lambda r: f"{f(phase(r, 'register')['etcd']['rpc_unary_total'] / r['hosts'], 1)} / "
         f"{f(phase(r, 'register')['etcd']['proposals_committed'] / r['hosts'], 1)}"),
        ("steady: runs/s", lambda r: f(phase(r, "idle")["runs_per_s"], 0)),
        ("steady: etcd requests / writes per run",
         lambda r: f"{f(phase(r, 'idle')['etcd']['rpc_unary_total'] / r['hosts'], 1)} / "
         f"{f(phase(r, 'idle')['etcd']['proposals_committed'] / r['hosts'], 1)}"),
        ("steady: etcd CPU ms per run", lambda r: f(phase(r, "idle")["etcd"]["cpu_s"] * 1e3 / r["hosts"], 2)),
        (f"derived: etcd writes/s at a {REAL_INTERVAL / 60:.0f}-min interval, nothing to roll out",
         lambda r: f(phase(r, "idle")["etcd"]["proposals_committed"] / REAL_INTERVAL, 0)),
        ("etcd db growth per steady round (MB; no compaction configured)",
         lambda r: f(phase(r, "idle")["etcd"]["db_mb"] - phase(r, "register")["etcd"]["db_mb"], 1)),
        (f"derived: db growth per day at a {REAL_INTERVAL / 60:.0f}-min interval (MB), against etcd's 2 GB default quota",
         lambda r: f((phase(r, "idle")["etcd"]["db_mb"] - phase(r, "register")["etcd"]["db_mb"]) * 86400 / REAL_INTERVAL, 0)),
    ],
)

table(
    "view(): what every host asking about a new commit reads (alone, one connection, nothing else running)",
    [
        ("statuses read", lambda r: f"{phase(r, 'probe')['statuses']:,}"),
        ("bytes read per view (keys + JSON values)", lambda r: f"{phase(r, 'probe')['status_bytes'] / 1e6:.2f} MB"),
        ("bytes per status", lambda r: f(phase(r, "probe")["bytes_per_status"], 0)),
        ("view ms min / median / max", lambda r: mmm(phase(r, "probe")["view_ms"])),
        ("etcd CPU ms per view", lambda r: f(phase(r, "probe")["etcd"]["cpu_s"] * 1e3 / phase(r, "probe")["view_ms"]["n"], 1)),
        ("client CPU ms per view (decode + parse)", lambda r: f(phase(r, "probe")["sim_cpu_s"] * 1e3 / phase(r, "probe")["view_ms"]["n"], 1)),
        ("decide() ms min / median / max", lambda r: mmm(phase(r, "probe")["decide_ms"], 2)),
        (f"derived: MB read per {REAL_INTERVAL / 60:.0f}-min interval if every host asks once (N × bytes per view)",
         lambda r: f"{r['hosts'] * phase(r, 'probe')['status_bytes'] / 1e6:,.0f}"),
        (f"derived: etcd cores busy at a {REAL_INTERVAL / 60:.0f}-min interval if every host asks once",
         lambda r: f(r["hosts"] * phase(r, "probe")["etcd"]["cpu_s"] / phase(r, "probe")["view_ms"]["n"] / REAL_INTERVAL, 2)),
    ],
)

for name, title in [
    ("permits_small", "The semaphore alone, small limit: every host loops acquire → hold → release (refused: retry after 100 ms)"),
    ("permits_large", "The semaphore alone, limit = fleet size: the same loop"),
]:
    table(
        title,
        [
            ("max_concurrent", lambda r, n=name: f"{phase(r, n)['max_concurrent']:,}"),
            ("permits granted/s", lambda r, n=name: f(phase(r, n)["granted_per_s"], 1)),
            ("ceiling: max_concurrent / hold time", lambda r, n=name: f(phase(r, n)["limit_per_s"], 0)),
            ("most held at once", lambda r, n=name: f"{phase(r, n)['max_held_at_once']:,}"),
            ("acquire() refused (returned None)", lambda r, n=name: f"{phase(r, n)['refused']:,} of {phase(r, n)['refused'] + phase(r, n)['granted']:,}"),
            ("acquire ms min / median / max", lambda r, n=name: mmm(phase(r, n)["acquire_ms"])),
            ("etcd writes per acquire() call", lambda r, n=name: f(phase(r, n)["etcd"]["proposals_committed"] / phase(r, n)["acquire_ms"]["n"], 1)),
            ("etcd CPU (cores busy)", lambda r, n=name: f(phase(r, n)["etcd"]["cpu_s"] / phase(r, n)["wall_s"], 2)),
        ],
    )


def waves(r):
    p = phase(r, "rollout")
    return ", ".join(
        f"{w['wave']} {w['applied']:,}/{w['hosts']:,}"
        + (f" ({f(w['first_s'])}–{f(w['last_s'])} s)" if w["first_s"] is not None else "")
        for w in p["waves"]
    )


def rest_rate(r):
    w = phase(r, "rollout")["waves"][-1]
    if w["first_s"] is None or w["last_s"] <= w["first_s"]:
        return "–"
    return f(w["applied"] / (w["last_s"] - w["first_s"]), 1)


table(
    "A rollout (good commit): the hosts poll and ask, as the agent does",
    [
        ("finished", lambda r: "yes" if phase(r, "rollout")["done"] else
         f"**no**: {phase(r, 'rollout')['on_head']:,} of {r['hosts']:,} on it after {f(phase(r, 'rollout')['wall_s'], 0)} s"),
        ("time to full rollout (s)", lambda r: f(phase(r, "rollout")["time_to_done_s"])),
        ("per wave: applied/hosts (first–last apply, s)", waves),
        ("permits granted/s in the last wave", rest_rate),
        ("most permits held at once", lambda r: f"{phase(r, 'rollout')['max_held_at_once']:,}"),
        ("acquire() returned None after decide() said Apply (the host waits a poll)",
         lambda r: f"{phase(r, 'rollout')['refused_after_apply_decision']:,} of {phase(r, 'rollout')['granted'] + phase(r, 'rollout')['refused_after_apply_decision']:,}"),
        ("effective poll interval (phase time × hosts / runs finished)", lambda r: effective_interval(r, "rollout")),
        ("view ms min / median / max", lambda r: mmm(phase(r, "rollout")["view_ms"])),
        ("acquire ms min / median / max", lambda r: mmm(phase(r, "rollout")["acquire_ms"])),
        ("run ms min / median / max", lambda r: mmm(phase(r, "rollout")["run_ms"])),
        ("etcd requests per poll interval", lambda r: f(per_interval(phase(r, "rollout"), r, phase(r, "rollout")["etcd"]["rpc_unary_total"]), 0)),
        ("etcd writes (raft proposals) per poll interval", lambda r: f(per_interval(phase(r, "rollout"), r, phase(r, "rollout")["etcd"]["proposals_committed"]), 0)),
        ("  of which key puts + deletes (mvcc)", lambda r: f(per_interval(phase(r, "rollout"), r, phase(r, "rollout")["etcd"]["mvcc_put"] + phase(r, "rollout")["etcd"]["mvcc_delete"]), 0)),
        ("MB sent by etcd per poll interval", lambda r: f(per_interval(phase(r, "rollout"), r, phase(r, "rollout")["etcd"]["sent_mb"]), 0)),
        ("etcd CPU (cores busy) / simulator CPU (cores busy)", lambda r: f"{f(phase(r, 'rollout')['etcd']['cpu_s'] / phase(r, 'rollout')['wall_s'], 2)} / "
         f"{f(phase(r, 'rollout')['sim_cpu_s'] / phase(r, 'rollout')['wall_s'], 2)}"),
        ("etcd RSS (MB), db size (MB) at the end", lambda r: f"{f(phase(r, 'rollout')['etcd']['rss_mb'], 0)}, {f(phase(r, 'rollout')['etcd']['db_mb'], 0)}"),
        ("views completed per second", lambda r: f(phase(r, "rollout")["view_ms"]["n"] / phase(r, "rollout")["wall_s"], 1)),
        (f"derived: views per second a real fleet asks at a {REAL_INTERVAL / 60:.0f}-min interval (N / {REAL_INTERVAL:.0f} s)",
         lambda r: f(r["hosts"] / REAL_INTERVAL, 1)),
        ("errors (the run then waits: on_unreachable = \"wait\")", lambda r: errors(phase(r, "rollout"))),
    ],
)

def bad(r, fn):
    p = phase(r, "bad_commit")
    return fn(p) if p else "not run (the rollout did not finish)"


if any(phase(r, "bad_commit") for r in runs):
    table(
        "A bad commit after it: the canary reverts it and marks it bad",
        [
            ("every host halted or reverted (s)", lambda r: bad(r, lambda p: f(p["time_to_done_s"]) if p["done"] else "**no**")),
            ("hosts halted / canaries reverted", lambda r: bad(r, lambda p: f"{p['halted']:,} / {p['reverted']}")),
            ("hosts outside the canary wave that applied it", lambda r: bad(r, lambda p: f"{p['applied_bad_outside_canaries']}")),
            ("errors", lambda r: bad(r, errors)),
        ],
    )

table(
    "Every host waiting (the status a host publishes while it waits for the canary), then view()",
    [
        ("bytes per waiting status (key + JSON)", lambda r: f(phase(r, "all_waiting")["bytes_per_status"], 0)),
        ("bytes view() must read", lambda r: f"{phase(r, 'all_waiting')['status_bytes'] / 2**20:.2f} MiB"),
        ("view()", lambda r: "ok, " + mmm(phase(r, "all_waiting")["view_ms"]) + " ms" if phase(r, "all_waiting")["view"] == "ok"
         else "**fails**: " + short_error(phase(r, "all_waiting")["view"])),
        ("derived: hosts at which the statuses alone reach 4 MiB", lambda r: f(4 * 2**20 / phase(r, "all_waiting")["bytes_per_status"], 0)),
    ],
)
