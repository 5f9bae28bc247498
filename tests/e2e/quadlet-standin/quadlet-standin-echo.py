"""What hashicorp/http-echo does: answer every GET with one text.

Started by the stand-in quadlet generator (see podman-system-generator):
    quadlet-standin-echo.py PORT TEXT-FILE
"""
import http.server
import sys

port, text_file = int(sys.argv[1]), sys.argv[2]
with open(text_file, encoding="utf-8") as f:
    body = (f.read().strip() + "\n").encode()


class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Echo).serve_forever()
