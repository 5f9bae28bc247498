#!/usr/bin/env python3
"""Serves git repositories over HTTPS on loopback, for tests.

usage: https_git_server.py --root DIR --cert server.pem --key server.key [--port N]

Runs `git http-backend` (smart HTTP, protocol v0/v1/v2) as a CGI program for
every request, with GIT_PROJECT_ROOT=DIR and GIT_HTTP_EXPORT_ALL set, so
https://127.0.0.1:PORT/NAME.git serves DIR/NAME.git. Listens on 127.0.0.1
only; port 0 (the default) picks a free one. The first line on stdout is the
port; then it serves until killed (SIGTERM/SIGINT). Make the certificate with
make_test_ca.sh. Python 3.11 standard library only.
"""

import argparse
import http.server
import os
import shutil
import signal
import ssl
import subprocess
import sys


def find_http_backend():
    git = shutil.which("git")
    if git:
        try:
            exec_path = subprocess.run(
                [git, "--exec-path"], capture_output=True, text=True, check=True
            ).stdout.strip()
            candidate = os.path.join(exec_path, "git-http-backend")
            if os.access(candidate, os.X_OK):
                return candidate
        except (OSError, subprocess.CalledProcessError):
            pass
    for candidate in (
        "/usr/lib/git-core/git-http-backend",
        "/usr/libexec/git-core/git-http-backend",
        "/usr/local/libexec/git-core/git-http-backend",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    sys.exit("https_git_server: git-http-backend not found (is git installed?)")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    backend = ""
    root = ""

    def log_message(self, fmt, *args):
        if os.environ.get("HTTPS_GIT_SERVER_VERBOSE"):
            sys.stderr.write("https_git_server: " + (fmt % args) + "\n")

    def do_GET(self):
        self.run_backend()

    def do_POST(self):
        self.run_backend()

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers, up to the empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def run_backend(self):
        path, _, query = self.path.partition("?")
        body = self.read_body()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/"),
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_SOFTWARE": "https_git_server",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_LENGTH": str(len(body)),
        }
        for header, var in (
            ("Content-Type", "CONTENT_TYPE"),
            ("Content-Encoding", "HTTP_CONTENT_ENCODING"),
            ("Git-Protocol", "HTTP_GIT_PROTOCOL"),
            ("Accept", "HTTP_ACCEPT"),
        ):
            value = self.headers.get(header)
            if value is not None:
                env[var] = value
        proc = subprocess.run(
            [self.backend], input=body, capture_output=True, env=env, check=False
        )
        if proc.stderr:
            sys.stderr.write(proc.stderr.decode(errors="replace"))
        out = proc.stdout
        # CGI headers end at the first empty line (CRLF or LF line ends)
        candidates = [
            (pos, len(marker))
            for marker in (b"\r\n\r\n", b"\n\n")
            for pos in [out.find(marker)]
            if pos >= 0
        ]
        sep, sep_len = min(candidates) if candidates else (-1, 0)
        if proc.returncode != 0 or sep < 0:
            self.send_error(500, "git http-backend failed")
            return
        head, payload = out[:sep], out[sep + sep_len :]
        status = 200
        reason = "OK"
        headers = []
        for line in head.decode("latin-1").splitlines():
            if not line.strip():
                continue
            name, _, value = line.partition(":")
            value = value.strip()
            if name.lower() == "status":
                code, _, reason = value.partition(" ")
                status = int(code)
            else:
                headers.append((name, value))
        self.send_response(status, reason or None)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class TLSServer(http.server.ThreadingHTTPServer):
    """Does the TLS handshake in the request's thread, not in accept(), so a
    stuck client cannot block the listener."""

    daemon_threads = True
    context = None

    def finish_request(self, request, client_address):
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            if os.environ.get("HTTPS_GIT_SERVER_VERBOSE"):
                sys.stderr.write(f"https_git_server: TLS handshake failed: {err}\n")
            return
        self.RequestHandlerClass(tls, client_address, self)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    Handler.backend = find_http_backend()
    Handler.root = os.path.abspath(args.root)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    TLSServer.context = context
    server = TLSServer(("127.0.0.1", args.port), Handler)

    def stop(_signum, _frame):
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
