"""Reads wrk's output on stdin and prints one figure for scripts/bench:
`rps` requests/s, `bulk` MB/s, `lat` "p50/p99" latency in microseconds.
Errors wrk reports (non-2xx answers, socket errors) go to stderr, so a broken path is seen."""
import re
import sys

what = sys.argv[1]
out = sys.stdin.read()
for bad in re.findall(r"(Non-2xx.*|Socket errors.*)", out):
    print(f"  ({bad})", file=sys.stderr)
if what == "rps":
    print(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
elif what == "bulk":
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]B)", out)
    print(float(m.group(1)) * {"KB": 1 / 1024, "MB": 1, "GB": 1024}[m.group(2)])
elif what == "lat":
    unit = {"us": 1, "ms": 1e3, "s": 1e6}

    def micros(v):
        m = re.match(r"([\d.]+)(us|ms|s)$", v)
        return float(m.group(1)) * unit[m.group(2)]

    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    print(f"{micros(lat['50']):.0f}/{micros(lat['99']):.0f}")
else:
    sys.exit(f"unknown figure {what}")
