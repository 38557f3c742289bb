#!/usr/bin/env python3
"""SDS fan-out: how long a rotation takes to reach every open SDS stream.

Starts `svidcar run` with a dev identity whose SVID is re-minted every `--ttl`/2 and an
SDS unix socket, opens `--streams` StreamSecrets streams (state of the world, gRPC
`grpcio` asyncio) for the resource "default" spread over connections of at most
`--per-connection` streams, and ACKs every response as Envoy does (version_info and
response_nonce of the response). Then, for each of `--rotations` rotations, it takes for
every stream the delay from "published" to "push received on that stream":

- published: svidcar's gauge `svidcar_identity_updated_timestamp_seconds`, the unix time
  at which the new identity snapshot was stored, taken before the change is signalled
  to the SDS streams (read from /metrics once every stream has the new version);
- received: `time.time()` taken right after the read of the response returns, before
  the message is decoded or ACKed. Both clocks are this machine's CLOCK_REALTIME.

The receipt time includes the time the client takes to get to the message, so the
client's CPU time during each fan-out is printed beside svidcar's (all threads). Python
grpcio costs about 0.1 ms of CPU per push and ACK, so with 1000 streams it keeps a core
busy for about as long as the fan-out lasts and sets the figures itself; `--client
target/release/examples/sds_fanout` (examples/sds_fanout.rs, tonic, built with `cargo
build --release --example sds_fanout`) drives the same streams at a fraction of that and
reports its receipt times to this script, which does everything else.

Per-rotation figures go to stderr; the last line, on stdout, is the summary over every
(stream, rotation), e.g.
  sds fan-out: 1000 streams, 3 rotations: p50 X ms, p99 Y ms, max Z ms (all streams updated)
Exit status 1 if a stream missed a rotation, or the p99 is over `--max-p99` when given.

Usage: scripts/sds_fanout.py --svidcar target/release/svidcar [--streams 1000] [--rotations 3]
         [--client target/release/examples/sds_fanout] [--max-p99 100]
For grpcio, the protobuf messages are encoded by hand (field numbers from proto/envoy/service/
discovery/v3/discovery.proto), so grpcio is the only dependency.
"""

import argparse
import asyncio
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    import grpc
except ImportError:  # only --client then
    grpc = None

METHOD = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


# --- protobuf wire format, the few fields we need ---------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string_field(num, value):
    data = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(data)) + data


def discovery_request(version="", nonce="", node_id=None):
    """DiscoveryRequest: version_info=1, node=2 (Node.id=1), resource_names=3,
    type_url=4, response_nonce=5."""
    msg = b""
    if version:
        msg += string_field(1, version)
    if node_id is not None:
        msg += string_field(2, string_field(1, node_id))
    msg += string_field(3, "default") + string_field(4, SECRET_TYPE)
    if nonce:
        msg += string_field(5, nonce)
    return msg


def response_version_nonce(buf):
    """(version_info=1, nonce=5) of a DiscoveryResponse; other fields skipped."""
    version = nonce = ""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            if num == 1:
                version = buf[i:i + n].decode()
            elif num == 5:
                nonce = buf[i:i + n].decode()
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return version, nonce


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


# --- the streams --------------------------------------------------------------------

class Receipts:
    """When each stream received each version."""

    def __init__(self, streams):
        self.streams = streams
        self.at = {}  # version -> {stream: unix time}
        self.complete = {}  # version -> asyncio.Event, set once every stream has it
        self.errors = []

    def event(self, version):
        return self.complete.setdefault(version, asyncio.Event())

    def got(self, stream, version, t):
        streams = self.at.setdefault(version, {})
        streams[stream] = t
        if len(streams) == self.streams:
            self.event(version).set()

    def error(self, what):
        self.errors.append(what)
        for e in self.complete.values():
            e.set()

    async def wait(self, version, timeout):
        """Whether every stream got `version` within `timeout` seconds."""
        try:
            await asyncio.wait_for(self.event(version).wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return not self.errors and len(self.at.get(version, {})) == self.streams


async def run_stream(channel, i, receipts):
    call = channel.stream_stream(METHOD)()  # no serializers: bytes in, bytes out
    try:
        await call.write(discovery_request(node_id=f"fanout-{i}"))
        while True:
            msg = await call.read()
            t = time.time()
            if msg is grpc.aio.EOF:
                receipts.error(f"stream {i}: ended by svidcar")
                return
            version, nonce = response_version_nonce(msg)
            receipts.got(i, int(version), t)
            await call.write(discovery_request(version, nonce))  # ACK, as Envoy
    except grpc.aio.AioRpcError as e:
        receipts.error(f"stream {i}: {e.code().name} {e.details()}")
    except asyncio.CancelledError:
        call.cancel()


# --- svidcar ------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(admin):
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def published(admin):
    """(identity version, unix time it was published) as svidcar reports them."""
    m = metrics(admin)
    return int(m["svidcar_identity_version"]), m["svidcar_identity_updated_timestamp_seconds"]


def cpu_seconds(pid):
    """CPU time of every live thread of `pid` (schedstat: nanoseconds, not ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended meanwhile
            pass
    return total / 1e9


def start_svidcar(args, work):
    sock = os.path.join(work, "sds.sock")
    admin = f"127.0.0.1:{free_port()}"
    threads = f"worker_threads: {args.worker_threads}\n" if args.worker_threads else ""
    config = os.path.join(work, "svidcar.yaml")
    with open(config, "w") as f:
        f.write(f"""{threads}log: {{level: warn}}
admin: {{listen: "{admin}"}}
identity:
  dev: {{spiffe_id: "spiffe://example.org/ns/bench/sa/fanout", svid_ttl: {round(args.ttl * 1000)}ms}}
sds:
  listen: unix://{sock}
  max_streams: {args.streams}
  max_streams_per_connection: {min(args.per_connection, args.streams)}
""")
    log = open(os.path.join(work, "svidcar.log"), "w")
    proc = subprocess.Popen([args.svidcar, "run", "--config", config], stderr=log)
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"svidcar exited: {open(log.name).read()}")
        try:
            urllib.request.urlopen(f"http://{admin}/ready", timeout=1)
            return proc, sock, admin
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("svidcar never became ready")


def percentile(sorted_values, p):
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


async def grpcio_streams(args, sock, receipts):
    """The streams in this process; returns what stops them."""
    n = args.streams
    # A local subchannel pool per channel: one connection each, not one shared.
    channels = [
        grpc.aio.insecure_channel(f"unix:{sock}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(math.ceil(n / args.per_connection))
    ]
    tasks = [asyncio.create_task(run_stream(channels[i // args.per_connection], i, receipts))
             for i in range(n)]

    async def stop():
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()
    return stop, None


async def client_streams(args, sock, receipts):
    """The streams in `--client` (examples/sds_fanout.rs), which prints a line per
    response: STREAM VERSION UNIX_TIME, the time taken there."""
    proc = await asyncio.create_subprocess_exec(
        args.client, sock, str(args.streams), str(args.per_connection),
        stdout=asyncio.subprocess.PIPE)

    async def read():
        rest = b""
        while chunk := await proc.stdout.read(1 << 16):  # whole chunks: cheaper than lines
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                stream, version, t = line.decode().split(" ", 2)
                if stream == "error":
                    receipts.error(f"stream {version}: {t}")
                else:
                    receipts.got(int(stream), int(version), float(t))
        receipts.error("--client exited")
    reader = asyncio.create_task(read())

    async def stop():
        proc.terminate()
        await proc.wait()
        reader.cancel()
    return stop, proc.pid


async def measure(args, sock, admin, pid):
    n = args.streams
    connections = math.ceil(n / args.per_connection)
    receipts = Receipts(n)
    open_streams = client_streams if args.client else grpcio_streams
    stop, client_pid = await open_streams(args, sock, receipts)
    # CPU seconds of: this script, --client, svidcar.
    cpu = lambda: (time.process_time(), cpu_seconds(client_pid) if client_pid else 0, cpu_seconds(pid))
    try:
        return await rotations(args, admin, receipts, cpu, connections)
    finally:
        await stop()


async def rotations(args, admin, receipts, cpu, connections):
    n = args.streams
    period = args.ttl / 2
    say = lambda *a: print(*a, file=sys.stderr, flush=True)
    # Every stream holds the current version before a rotation is measured (a stream
    # opened before it was published got it as a push); a rotation during set-up just
    # means waiting for the next.
    deadline = time.monotonic() + 60
    while True:
        version, _ = published(admin)
        complete = await receipts.wait(version, period)
        if complete and published(admin)[0] == version:
            break
        if receipts.errors or time.monotonic() > deadline:
            got = len(receipts.at.get(version, {}))
            return fail(receipts, f"set-up: {got}/{n} streams have version {version}")
    say(f"{n} streams open on {connections} connections, identity version {version}; "
        f"a rotation every {period:g} s")
    delays = []
    for r in range(1, args.rotations + 1):
        target = version + r
        cpu0 = cpu()
        ok = await receipts.wait(target, 2 * period + 5)
        script, client, svidcar = (1000 * (b - a) for a, b in zip(cpu0, cpu()))
        got = receipts.at.get(target, {})
        if not ok:
            return fail(receipts, f"rotation {r} (version {target}): {len(got)}/{n} streams updated")
        now_version, t_pub = published(admin)
        if now_version != target:
            return fail(receipts, f"rotation {r}: version {now_version} was published before "
                                  f"version {target} reached every stream")
        d = sorted((t - t_pub) * 1000 for t in got.values())
        delays += d
        say(f"rotation {r} (version {target}): {len(got)}/{n} streams, "
            f"p50 {percentile(d, 50):.1f} ms, p99 {percentile(d, 99):.1f} ms, "
            f"min {d[0]:.1f} ms, max {d[-1]:.1f} ms; CPU meanwhile: svidcar {svidcar:.0f} ms, "
            f"client {script + client:.0f} ms" + (f" ({script:.0f} ms of it this script)" if args.client else ""))
    m = metrics(admin)
    count = lambda kind: int(m.get('svidcar_sds_requests_total{kind="%s"}' % kind, 0))
    say(f"svidcar counted {count('ack')} ACKs, {count('nack')} NACKs, "
        f"{int(m['svidcar_sds_responses_total'])} responses")
    delays.sort()
    p99 = percentile(delays, 99)
    print(f"sds fan-out: {n} streams, {args.rotations} rotations: p50 {percentile(delays, 50):.1f} ms, "
          f"p99 {p99:.1f} ms, max {delays[-1]:.1f} ms (all streams updated)", flush=True)
    return 0 if args.max_p99 is None or p99 <= args.max_p99 else 1


def fail(receipts, what):
    for e in receipts.errors[:5]:
        print(e, file=sys.stderr)
    print(f"sds fan-out: FAILED: {what}", flush=True)
    return 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--svidcar", required=True, help="the svidcar binary")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--rotations", type=int, default=3)
    p.add_argument("--per-connection", type=int, default=100,
                   help="streams per gRPC connection (svidcar's max_streams_per_connection)")
    p.add_argument("--ttl", type=float, default=4, help="svid_ttl in seconds (>= 2); rotation at half")
    p.add_argument("--worker-threads", type=int, help="svidcar worker_threads (default: all cores)")
    p.add_argument("--client", help="drive the streams with this binary (cargo build --release "
                   "--example sds_fanout) instead of grpcio in this process")
    p.add_argument("--max-p99", type=float, help="exit 1 if the p99 is over this many ms")
    args = p.parse_args()
    if not args.client and grpc is None:
        sys.exit("grpcio is not installed (pip install grpcio); or use --client")
    with tempfile.TemporaryDirectory(prefix="sds-fanout.") as work:
        proc, sock, admin = start_svidcar(args, work)
        try:
            code = asyncio.run(measure(args, sock, admin, proc.pid))
        finally:
            proc.terminate()
            proc.wait()
    sys.exit(code)


if __name__ == "__main__":
    main()
