#!/usr/bin/env python3
"""The second peer: render-only, confd-style.

    peer_jinja.py REPO ROOT

Reads the workload's variables (ansible/vars.yml) and templates straight
from the working tree, renders them with jinja2 (trim_blocks, as Ansible
does) and writes a file only when its content differs. No git, no
atomic replacement, no fsync, no inventory, no pruning: the least a
template tool can do, which is what a user who gives up on a real agent
would script. Runs in the bench virtualenv (jinja2 and PyYAML come with
ansible-core).
"""

import os
import sys

import jinja2
import yaml


def main():
    repo, root = sys.argv[1], sys.argv[2]
    with open(os.path.join(repo, "ansible", "vars.yml")) as f:
        variables = yaml.safe_load(f)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(os.path.join(repo, "roles", "bench", "files")),
        trim_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    out_dir = os.path.join(root, "etc", "bench")
    os.makedirs(out_dir, exist_ok=True)
    for name in variables["bench_files"]:
        text = env.get_template(name + ".tera").render(vars=variables)
        target = os.path.join(out_dir, name)
        try:
            with open(target) as f:
                if f.read() == text:
                    continue
        except FileNotFoundError:
            pass
        with open(target, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
