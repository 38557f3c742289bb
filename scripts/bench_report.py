"""Prints scripts/bench's results from the runs it recorded, one markdown table row per
scenario: both proxies' req/s, p50/p99 latency, CPU per request and RSS, the ratio and
whether the target is met; median and (min-max) over the runs.

Usage: bench_report.py RUNS_FILE SECONDS_PER_RUN CLK_TCK
RUNS_FILE lines: scenario proxy requests rps p50_us p99_us mb_s cpu_ticks rss_kib
                 resumed0 handshakes0 resumed1 handshakes1
"""
import statistics as st
import sys
from collections import defaultdict

runs_file, _seconds, clk_tck = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
runs = defaultdict(list)
for line in open(runs_file):
    f = line.split()
    scen, proxy = f[0], f[1]
    requests, rps, p50, p99, mbps, ticks, rss = map(float, f[2:9])
    r0, h0, r1, h1 = map(float, f[9:13])
    runs[(scen, proxy)].append(
        {
            "rps": rps,
            "p50": p50,
            "p99": p99,
            "mbps": mbps,
            "cpu": ticks * 1e6 / clk_tck / requests if ticks else None,
            "rss": rss / 1024,
            "handshakes": h1 - h0,
            "resumed": r1 - r0,
        }
    )


def values(scen, proxy, key):
    return [r[key] for r in runs[(scen, proxy)] if r[key] is not None]


def med(scen, proxy, key):
    v = values(scen, proxy, key)
    return st.median(v) if v else None


def spread(scen, proxy, key, fmt="{:,.0f}"):
    v = values(scen, proxy, key)
    if not v:
        return "-"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(st.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def latency(scen, proxy):
    if not values(scen, proxy, "p50"):
        return "-"
    return f"{med(scen, proxy, 'p50'):,.0f} / {med(scen, proxy, 'p99'):,.0f}"


def resumption(scen, proxy):
    hs = sum(values(scen, proxy, "handshakes"))
    if not hs:
        return ""
    return f"{100 * sum(values(scen, proxy, 'resumed')) / hs:.0f}% of {hs:,.0f}"


# scenario, label, figure compared (rps or mbps), target ratio, whether CPU and p99 are
# part of the target
SCENARIOS = [
    ("tcp_ka", "TCP keep-alive, 16 conns", "rps", 1.5, True),
    ("tcp_nc", "TCP new conn per request (defaults)", "rps", 1.5, False),
    ("tcp_full", "TCP new conn, full handshakes forced", "rps", 1.4, False),
    ("tcp_bulk", "TCP 1 MiB bulk, 4 conns (MB/s)", "mbps", 1.2, False),
    ("tcp_lat", "TCP latency, 1 conn", "rps", 1.2, False),
    ("http_ka", "HTTP keep-alive, 16 conns", "rps", 1.5, False),
    ("http_nc", "HTTP new conn from the app", "rps", 1.5, False),
    ("http_bulk", "HTTP 1 MiB bulk, 4 conns (MB/s)", "mbps", None, False),
    ("http_lat", "HTTP latency, 1 conn", "rps", None, False),
]
n = max((len(v) for v in runs.values()), default=0)
print(f"median (min-max) over {n} runs; latency p50 / p99 in us; CPU per request is both")
print("proxies of a pair together; RSS is the pair's two processes after the run (the")
print("svidcar pair serves every svidcar scenario; Envoy has one pair per shape)")
print()
print(
    "| scenario | svidcar | Envoy | ratio | target | svidcar p50/p99 | Envoy p50/p99 "
    "| svidcar CPU/req (us) | Envoy CPU/req (us) | svidcar RSS (MiB) | Envoy RSS (MiB) "
    "| resumed: svidcar | resumed: Envoy |"
)
print("|" + "---|" * 13)
verdicts = []
for scen, label, fig, target, strict in SCENARIOS:
    if not runs.get((scen, "svidcar")) or not runs.get((scen, "envoy")):
        continue
    ratio = med(scen, "svidcar", fig) / med(scen, "envoy", fig)
    verdict = ""
    if target:
        ok = ratio >= target
        why = [f"{ratio:.2f}x vs {target}x"]
        if strict:
            cpu = med(scen, "svidcar", "cpu") / med(scen, "envoy", "cpu")
            p99 = med(scen, "svidcar", "p99") <= med(scen, "envoy", "p99")
            ok = ok and cpu <= 0.67 and p99
            why.append(f"CPU {cpu:.2f}x vs 0.67x")
            why.append("p99 " + ("no worse" if p99 else "worse"))
        verdict = ("met" if ok else "NOT met") + f" ({', '.join(why)})"
        verdicts.append(f"{label}: {verdict}")
    fmt = "{:,.0f}"
    print(
        f"| {label} | {spread(scen, 'svidcar', fig, fmt)} | {spread(scen, 'envoy', fig, fmt)} "
        f"| {ratio:.2f}x | {'≥ ' + str(target) + 'x' if target else '-'} "
        f"| {latency(scen, 'svidcar')} | {latency(scen, 'envoy')} "
        f"| {spread(scen, 'svidcar', 'cpu', '{:.1f}')} | {spread(scen, 'envoy', 'cpu', '{:.1f}')} "
        f"| {med(scen, 'svidcar', 'rss'):.1f} | {med(scen, 'envoy', 'rss'):.1f} "
        f"| {resumption(scen, 'svidcar')} | {resumption(scen, 'envoy')} |"
    )
print()
# The n-th svidcar run and the n-th Envoy run of a scenario ran back to back (which one
# first alternates between repetitions): their ratio
# is a pair of neighbours, which drift on a shared machine moves less than the medians.
print("paired: each svidcar run against the Envoy run beside it, median (min-max) of the")
print("runs' ratios (the table's ratio and the verdicts are the ratios of the medians):")
for scen, label, fig, _target, _strict in SCENARIOS:
    pairs = list(zip(runs.get((scen, "svidcar"), []), runs.get((scen, "envoy"), [])))
    if not pairs:
        continue
    speed = [s[fig] / e[fig] for s, e in pairs]
    cpu = [s["cpu"] / e["cpu"] for s, e in pairs if s["cpu"] and e["cpu"]]
    line = f"  {label}: {st.median(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f})"
    if cpu:
        line += f", CPU per request {st.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f})"
    print(line)
print()
for key, label in [("direct_ka", "keep-alive"), ("direct_nc", "new connection")]:
    if runs.get((key, "nginx")):
        print(f"direct to nginx, no proxy, {label}: {spread(key, 'nginx', 'rps')} req/s")
print()
print("authorization on the svidcar HTTP pair, keep-alive (svidcar only; target: under 10% of the plain pair):")
print("  (each run paired with the plain-pair run just before it; cost = median of the pairs' costs)")
for scen, base, label in [
    ("rules_ka", "rules_base", "20 per-route rules"),
    ("rego_ka", "rego_base", "Rego policy, repeated requests (decisions cached)"),
    ("rego_var", "http_var", "Rego policy, every path new (every request evaluated)"),
]:
    # The n-th run of each scenario follows the n-th run of its plain-pair baseline.
    pairs = list(zip(runs.get((base, "svidcar"), []), runs.get((scen, "svidcar"), [])))
    if not pairs:
        continue
    costs = [1 - r["rps"] / b["rps"] for b, r in pairs]
    cpus = [r["cpu"] - b["cpu"] for b, r in pairs if r["cpu"] is not None and b["cpu"] is not None]
    cost = st.median(costs)
    cpu = f"{st.median(cpus):+.1f}" if cpus else "?"
    print(
        f"  {label}: {spread(scen, 'svidcar', 'rps')} req/s; costs {100 * cost:.1f}% of req/s "
        f"({100 * min(costs):.1f} to {100 * max(costs):.1f}% over {len(pairs)} pairs), "
        f"{cpu} us CPU per request ({'met' if round(100 * cost, 1) < 10.0 else 'NOT met'})"
    )
print()
print("targets:")
for v in verdicts:
    print(f"  {v}")
