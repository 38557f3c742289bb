"""Reads wrk's output (run with --latency) on stdin and prints, for scripts/bench, one
line: requests completed, requests/s, p50 and p99 latency in microseconds, MB/s read.
Errors wrk reports (non-2xx answers, socket errors) go to stderr, so a broken path is seen,
and a run with no completed request fails."""
import re
import sys

out = sys.stdin.read()
for bad in re.findall(r"(Non-2xx.*|Socket errors.*)", out):
    print(f"  ({bad})", file=sys.stderr)
UNIT = {"us": 1, "ms": 1e3, "s": 1e6}


def micros(v):
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    return float(m.group(1)) * UNIT[m.group(2)]


try:
    done = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    mbps = float(m.group(1)) * {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[m.group(2)]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    p50, p99 = micros(lat["50"]), micros(lat["99"])
except (AttributeError, KeyError) as e:
    sys.exit(f"wrk printed no figures ({e}):\n{out}")
if done == 0:
    sys.exit(f"wrk completed no request:\n{out}")
print(f"{done} {rps:.1f} {p50:.0f} {p99:.0f} {mbps:.2f}")
