"""Prints scripts/bench's table from the figures it collected: KEY=v1 v2 ... per scenario,
each the result of one wrk run; median and (min-max) over the runs."""
import statistics as st
import sys

rss = sys.argv[1]
R = {}
for arg in sys.argv[2:]:
    key, _, vals = arg.partition("=")
    R[key] = vals.split()


def num(k):
    return [float(x) for x in R[k]]


def med(k):
    return st.median(num(k))


def show(k):
    v = num(k)
    return f"{st.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})" if len(v) > 1 else f"{v[0]:,.0f}"


def lat(k):
    p50 = [float(x.split("/")[0]) for x in R[k]]
    p99 = [float(x.split("/")[1]) for x in R[k]]
    return f"p50 {st.median(p50):.0f} us, p99 {st.median(p99):.0f} us ({min(p99):.0f}-{max(p99):.0f})"


def ratio(a, b):
    return med(a) / med(b)


print("median (min-max) over the runs; req/s unless stated")
print(f"{'path':36s} {'keep-alive':>24s} {'new conn from the app':>24s}")
for label, ka, nc in [
    ("direct to nginx (no proxy)", "direct_ka", "direct_nc"),
    ("TCP: svidcar pair (1 worker each)", "s_ka", "s_nc"),
    ("TCP: Envoy 1.40 pair (tcp_proxy)", "e_ka", "e_nc"),
    ("HTTP: svidcar pair (pooled h2)", "sh_ka", "sh_nc"),
    ("HTTP: Envoy 1.40 pair (HCM, h2)", "eh_ka", "eh_nc"),
]:
    print(f"{label:36s} {show(ka):>24s} {show(nc):>24s}")
print(f"{'TCP: svidcar, full handshakes':36s} {'':>24s} {show('sf_nc'):>24s}")
print(f"{'TCP: Envoy, full handshakes':36s} {'':>24s} {show('ef_nc'):>24s}")
print(f"{'HTTP: svidcar, 20 rules':36s} {show('sr_ka'):>24s}")
print(f"{'HTTP: svidcar, Rego policy':36s} {show('sg_ka'):>24s}")
print(f"{'HTTP: svidcar, every path new':36s} {show('sh_var'):>24s}")
print(f"{'HTTP: svidcar, Rego, every path new':36s} {show('sg_var'):>24s}")
print(f"HTTP bulk, 1 MiB responses, 4 conns (MB/s): svidcar {show('sh_bulk')}, Envoy {show('eh_bulk')}")
print(f"HTTP latency, 1 connection: svidcar {lat('sh_lat')}; Envoy {lat('eh_lat')}")
def cpu(k):
    v = num(k + "_cpu")
    return f"{st.median(v):.1f} us ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else f"{v[0]:.1f} us"


print(
    f"CPU per request, both proxies of a pair, keep-alive: TCP svidcar {cpu('s_ka')}, Envoy {cpu('e_ka')}; "
    f"HTTP svidcar {cpu('sh_ka')}, Envoy {cpu('eh_ka')}"
)
print(f"RSS after load (KiB): {rss}")
print(
    f"svidcar/envoy: TCP keep-alive {ratio('s_ka', 'e_ka'):.2f}x, TCP new connection {ratio('s_nc', 'e_nc'):.2f}x, "
    f"HTTP keep-alive {ratio('sh_ka', 'eh_ka'):.2f}x, HTTP new connection from the app {ratio('sh_nc', 'eh_nc'):.2f}x, "
    f"HTTP bulk {ratio('sh_bulk', 'eh_bulk'):.2f}x (target: 1.5x); TCP new connection, full handshakes forced "
    f"{ratio('sf_nc', 'ef_nc'):.2f}x (target: 1.4x)"
)
print(
    f"authorization cost vs the plain HTTP pair, keep-alive: 20 rules {100 * (1 - ratio('sr_ka', 'sh_ka')):.1f}%, "
    f"Rego {100 * (1 - ratio('sg_ka', 'sh_ka')):.1f}% (repeated requests: decisions cached), "
    f"Rego with every path new {100 * (1 - ratio('sg_var', 'sh_var')):.1f}% (every request evaluated) (target: under 10%)"
)
