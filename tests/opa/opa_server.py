"""A small server speaking OPA's REST Data API, for tests: there is no OPA binary here.

POST /v1/data/<path> with {"input": ...} evaluates data.<path dots> with rego-cpp
(PyPI regopy, an independent Rego engine) over the policy files given on the command
line, and answers as OPA does: 200 {"result": ...}, or 200 {} when the rule is undefined
for that input, or 500 {"code": "internal_error", ...} when evaluation fails (OPA's
answer to conflicting rule values, for example).

usage: opa_server.py PORT [--delay SECONDS] [--log FILE] POLICY.rego...
--delay waits before every answer (an OPA that is too slow); --log appends each request's
input, one JSON document a line. Prints "ready" once listening.
"""
import http.server
import json
import sys
import time

import regopy

args = sys.argv[1:]
port = int(args.pop(0))
delay = 0.0
log = None
while args and args[0].startswith("--"):
    opt = args.pop(0)
    if opt == "--delay":
        delay = float(args.pop(0))
    elif opt == "--log":
        log = args.pop(0)
    else:
        raise SystemExit("unknown option " + opt)
modules = [(path, open(path).read()) for path in args]


def evaluate(rule, doc):
    """(status, answer) as OPA's Data API gives them."""
    interp = regopy.Interpreter()
    for name, text in modules:
        interp.add_module(name, text)
    interp.set_input_term(json.dumps(doc))
    out = interp.query("x = data." + rule)
    if not out.ok():
        return 500, {"code": "internal_error", "message": str(out)}
    if str(out) == "undefined":
        return 200, {}
    return 200, {"result": json.loads(out.binding("x").json())}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1

    def answer(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n)
        if not self.path.startswith("/v1/data/"):
            return self.answer(404, {"code": "resource_not_found", "message": self.path})
        try:
            doc = json.loads(raw)["input"]
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(400, {"code": "invalid_parameter", "message": str(e)})
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"path": self.path, "input": doc}) + "\n")
        if delay:
            time.sleep(delay)
        rule = self.path[len("/v1/data/"):].strip("/").replace("/", ".")
        status, out = evaluate(rule, doc)
        self.answer(status, out)

    def log_message(self, *a):
        pass


srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
srv.daemon_threads = True
print("ready", flush=True)
srv.serve_forever()
