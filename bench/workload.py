#!/usr/bin/env python3
"""Generates the benchmark workloads as real git repositories.

    workload.py templates DIR --files N
        A config repository with N templated files for host `bench1`, and
        the equivalent Ansible playbook under ansible/ (same template bytes,
        same variables) for the ansible-pull peer.

    workload.py history DIR --commits C --data-files D
        A repository with C commits touching D data files under data/, plus a
        small driftless config under config/ (what a host renders). For W7:
        the cost of one incremental fetch on a long history.

    workload.py commit DIR --touch PATH [--message M]
        Appends one line to PATH and commits it (W4, W7).

Every template is ~40 rendered lines: a header with a few host variables and
a loop over 20 upstream entries. The templates are written so that Tera and
Jinja2 (with Ansible's trim_blocks) render the same bytes, which the bench
checks, so both tools provably did the same work.
"""

import argparse
import os
import subprocess
import sys

UPSTREAMS = 20


def git(repo, *args, env=None, stdin=None):
    full_env = dict(os.environ)
    full_env.update(
        {
            "GIT_AUTHOR_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "bench@example.com",
            "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@example.com",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": repo,
        }
    )
    if env:
        full_env.update(env)
    return subprocess.run(
        ["git", "-C", repo, *args],
        check=True,
        env=full_env,
        input=stdin,
        stdout=subprocess.PIPE,
    ).stdout


def template(i):
    """One service's config template: ~20 fixed lines + 20 loop lines."""
    return f"""# Managed by configuration management: service {i:04d}.
# Do not edit by hand; changes are overwritten.
# host: {{{{ vars.host_name }}}} ({{{{ vars.env_name }}}}, {{{{ vars.datacenter }}}})

[service]
name = "svc-{i:04d}"
listen = "0.0.0.0:{{{{ vars.base_port + {i} }}}}"
workers = {{{{ vars.workers }}}}
log_level = "{{{{ vars.log_level }}}}"
admin = "{{{{ vars.admin_email }}}}"

[limits]
max_connections = {{{{ vars.workers * 256 }}}}
timeout_seconds = 30
keepalive_seconds = 75

[upstreams]
# {{{{ vars.upstreams | length }}}} backends, weighted
{{% for u in vars.upstreams %}}backend_{{{{ loop.index }}}} = "{{{{ u.host }}}}:{{{{ u.port }}}}" # weight={{{{ u.weight }}}} zone={{{{ u.zone }}}} name={{{{ u.name }}}}
{{% endfor -%}}
[health]
path = "/healthz"
interval_seconds = 10
unhealthy_threshold = 3
healthy_threshold = 2
"""


def upstreams():
    out = []
    for j in range(UPSTREAMS):
        out.append(
            {
                "name": f"backend-{j:02d}",
                "host": f"10.{j // 8}.{j % 8}.{10 + j}",
                "port": 8000 + j,
                "weight": 1 + j % 5,
                "zone": ["a", "b", "c"][j % 3],
            }
        )
    return out


HOST_VARS = {
    "host_name": "bench1.example.com",
    "env_name": "production",
    "datacenter": "ams1",
    "base_port": 10000,
    "workers": 4,
    "log_level": "info",
}
REPO_VARS = {"admin_email": "ops@example.com"}


def toml_value(v):
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[\n" + "".join(f"  {toml_value(x)},\n" for x in v) + "]"
    raise TypeError(v)


def yaml_value(v):
    # JSON is YAML: the Ansible side reads exactly the same values.
    import json

    return json.dumps(v)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_templates(root, files, prefix=""):
    """The driftless config (and the Ansible twin) under root/prefix."""
    base = os.path.join(root, prefix)
    write(
        os.path.join(base, "driftless.toml"),
        'roles = ["bench"]\n\n[vars]\n'
        + "".join(f"{k} = {toml_value(v)}\n" for k, v in REPO_VARS.items())
        + f"upstreams = {toml_value(upstreams())}\n",
    )
    write(
        os.path.join(base, "hosts/bench1.toml"),
        "[vars]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in HOST_VARS.items()),
    )
    role = ['description = "benchmark workload"\n']
    names = []
    for i in range(files):
        name = f"svc-{i:04d}.conf"
        names.append(name)
        write(os.path.join(base, f"roles/bench/files/{name}.tera"), template(i))
        role.append(
            f'\n[[files]]\npath = "/etc/bench/{name}"\ntemplate = "{name}.tera"\nmode = "0644"\n'
        )
    write(os.path.join(base, "roles/bench/role.toml"), "".join(role))
    # The Ansible twin: the same template files, the same variables. In
    # Ansible, `vars` is the magic dict of all variables, so `vars.x` in the
    # shared templates resolves there too.
    all_vars = dict(REPO_VARS)
    all_vars.update(HOST_VARS)
    all_vars["upstreams"] = upstreams()
    all_vars["bench_files"] = names
    write(
        os.path.join(base, "ansible/vars.yml"),
        "".join(f"{k}: {yaml_value(v)}\n" for k, v in all_vars.items()),
    )
    write(
        os.path.join(base, "ansible/site.yml"),
        """- hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - vars.yml
  tasks:
    - name: directory
      ansible.builtin.file:
        path: "{{ bench_root }}/etc/bench"
        state: directory
        mode: "0755"
    - name: render the service configs
      ansible.builtin.template:
        src: "{{ playbook_dir }}/../roles/bench/files/{{ item }}.tera"
        dest: "{{ bench_root }}/etc/bench/{{ item }}"
        mode: "0644"
      loop: "{{ bench_files }}"
""",
    )


def init_repo(path):
    os.makedirs(path, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "bench")
    git(path, "config", "user.email", "bench@example.com")
    git(path, "config", "commit.gpgsign", "false")


def cmd_templates(args):
    init_repo(args.dir)
    write_templates(args.dir, args.files)
    git(args.dir, "add", "-A")
    git(args.dir, "commit", "-q", "-m", f"{args.files} templated files")


def cmd_history(args):
    """C commits over D data files, written with git fast-import (seconds,
    not minutes), then a config commit on top."""
    init_repo(args.dir)
    lines = []
    mark = 0
    t0 = 1_700_000_000

    def blob(data):
        nonlocal mark
        mark += 1
        b = data.encode()
        lines.append(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(b), b))
        return mark

    def data_file(k, rev):
        return f"# data file {k}\nrevision = {rev}\n" + "x" * 200 + "\n"

    for c in range(args.commits):
        ops = []
        if c == 0:
            for k in range(args.data_files):
                ops.append((f"data/{k // 100:02d}/file-{k:05d}.txt", blob(data_file(k, 0))))
        else:
            k = (c * 7919) % args.data_files
            ops.append((f"data/{k // 100:02d}/file-{k:05d}.txt", blob(data_file(k, c))))
        msg = f"commit {c}".encode()
        when = t0 + c * 60
        head = b"commit refs/heads/main\n"
        head += b"author bench <bench@example.com> %d +0000\n" % when
        head += b"committer bench <bench@example.com> %d +0000\n" % when
        head += b"data %d\n%s\n" % (len(msg), msg)
        body = b"".join(b"M 100644 :%d %s\n" % (m, p.encode()) for p, m in ops)
        lines.append(head + body + b"\n")
    git(args.dir, "fast-import", "--quiet", stdin=b"".join(lines))
    git(args.dir, "checkout", "-q", "-f", "main")
    write_templates(args.dir, args.config_files, prefix="config")
    git(args.dir, "add", "-A")
    git(args.dir, "commit", "-q", "-m", "host config")
    git(args.dir, "gc", "-q")


def cmd_commit(args):
    path = os.path.join(args.dir, args.touch)
    with open(path, "a") as f:
        f.write(f"# {args.message}\n")
    git(args.dir, "add", args.touch)
    git(args.dir, "commit", "-q", "-m", args.message)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("templates")
    t.add_argument("dir")
    t.add_argument("--files", type=int, required=True)
    h = sub.add_parser("history")
    h.add_argument("dir")
    h.add_argument("--commits", type=int, default=10_000)
    h.add_argument("--data-files", type=int, default=5_000)
    h.add_argument("--config-files", type=int, default=10)
    c = sub.add_parser("commit")
    c.add_argument("dir")
    c.add_argument("--touch", required=True)
    c.add_argument("--message", default="bench change")
    args = p.parse_args()
    {"templates": cmd_templates, "history": cmd_history, "commit": cmd_commit}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
