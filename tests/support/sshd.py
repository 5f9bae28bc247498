#!/usr/bin/env python3
"""Runs a throw-away OpenSSH server on loopback, for tests.

usage: sshd.py --dir DIR [--port N]

Creates in DIR a host key, a client key pair, authorized_keys (the client
key), known_hosts (the host key for [127.0.0.1]:PORT) and an sshd_config,
then starts `sshd -D` on 127.0.0.1:PORT (port 0, the default, picks a free
one). Public-key login only, no PAM, StrictModes off: logging in as the
user running this script (root in tests) with the client key works.

Once the server accepts connections it prints, one per line:

    port=PORT
    user=USER
    key=DIR/client_ed25519
    known_hosts=DIR/known_hosts
    known_hosts_line=[127.0.0.1]:PORT ssh-ed25519 AAAA...
    ready

then serves until killed. sshd's log goes to DIR/sshd.log. sshd gets
SIGTERM when this script dies, however it dies (PR_SET_PDEATHSIG).

Needs Debian's openssh-server (`apt-get install -y openssh-server`) for
/usr/sbin/sshd, and ssh-keygen. Python 3.11 standard library only.
"""

import argparse
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def find_sshd():
    for candidate in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    sys.exit("sshd.py: sshd not found: apt-get install -y openssh-server")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path):
    if not os.path.exists(path):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "driftless-test", "-f", path],
            check=True,
        )


def die_with_parent():
    # PR_SET_PDEATHSIG = 1: sshd gets SIGTERM if this script goes away.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def wait_listening(port, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    sshd = find_sshd()
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    host_key = os.path.join(d, "host_ed25519")
    client_key = os.path.join(d, "client_ed25519")
    keygen(host_key)
    keygen(client_key)
    os.chmod(client_key, 0o600)

    authorized = os.path.join(d, "authorized_keys")
    shutil.copyfile(client_key + ".pub", authorized)

    port = args.port or free_port()
    with open(host_key + ".pub") as f:
        key_type, key_b64 = f.read().split()[:2]
    known_hosts_line = f"[127.0.0.1]:{port} {key_type} {key_b64}"
    known_hosts = os.path.join(d, "known_hosts")
    with open(known_hosts, "w") as f:
        f.write(known_hosts_line + "\n")

    # git must be on the PATH of the login session for git-upload-pack.
    git = shutil.which("git")
    session_path = ":".join(
        dict.fromkeys(
            ([os.path.dirname(git)] if git else [])
            + ["/usr/local/bin", "/usr/bin", "/bin"]
        )
    )
    for path in (d, session_path):
        if '"' in path or "\n" in path:
            sys.exit(f"sshd.py: cannot put {path!r} into sshd_config")
    config = os.path.join(d, "sshd_config")
    with open(config, "w") as f:
        f.write(
            f"""Port {port}
ListenAddress 127.0.0.1
HostKey "{host_key}"
PidFile "{os.path.join(d, "sshd.pid")}"
AuthorizedKeysFile "{authorized}"
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AcceptEnv GIT_PROTOCOL
SetEnv "PATH={session_path}"
LogLevel ERROR
"""
        )

    if os.geteuid() == 0:
        # Debian's sshd refuses to start without its privilege separation dir.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    log = open(os.path.join(d, "sshd.log"), "ab")
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", config],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        preexec_fn=die_with_parent,
    )

    def stop(_signum, _frame):
        proc.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if not wait_listening(port, proc):
        proc.terminate()
        log.flush()
        with open(os.path.join(d, "sshd.log"), errors="replace") as f:
            sys.stderr.write(f.read())
        sys.exit(f"sshd.py: sshd did not start listening on 127.0.0.1:{port}")

    print(f"port={port}")
    print(f"user={getpass.getuser()}")
    print(f"key={client_key}")
    print(f"known_hosts={known_hosts}")
    print(f"known_hosts_line={known_hosts_line}")
    print("ready", flush=True)
    sys.exit(proc.wait())


if __name__ == "__main__":
    main()
