"""CPU per provider-sized send: our socket and TLS paths against Trio's streams.

Run ``.venv/bin/python bench/tls_send.py`` (``make bench`` does).  A provider
link sends ~50 messages of a few hundred bytes a second per call; this
measures the sender's CPU (``getrusage``) per ``send_all`` of one 300-byte
message over loopback, to a receiver in another process that drains plain
TCP and TLS connections:

* plain TCP: ``trio.SocketStream.send_all`` (the peer) against
  ``ClientWebSocket``'s direct ``socket.send`` (``ws_client._send_raw``);
* TLS: ``trio.SSLStream.send_all`` (the peer) against
  :class:`mediaserver.transport.tls.TLSStream` (``SSLObject`` and memory
  BIOs on the raw socket), with the same context, TLS version and cipher.

Each figure is the median over ``--repeats`` rounds of ``--sends`` sends
(the first round is a warm-up and dropped); the ratio is peer ÷ ours.  The
certificate is made on the fly (``cryptography``) and trusted explicitly.
Nothing leaves the machine.  Options: ``--quick``, ``--sends``,
``--repeats``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import importlib.util
import os
import resource
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from _measure import (  # noqa: E402
    Column,
    check_output_path,
    cpu_model,
    die_with_parent,
    interrupt_on_sigterm,
    print_header,
    render_table,
    utc_now,
    write_json,
)
from mediaserver.transport.tls import TLSStream, open_tls_stream  # noqa: E402
from mediaserver.transport.ws_client import _send_raw  # noqa: E402

MESSAGE = b"x" * 300  # about one 20 ms µ-law append, base64 in JSON


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, in ``folder`` (needs the cryptography package)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mediaserver bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


def start_receiver(server_context: ssl.SSLContext) -> tuple[int, int, int]:
    """Fork a process that drains plain and TLS connections; (pid, plain port, TLS port)."""
    plain, tls = socket.socket(), socket.socket()
    for listener in (plain, tls):
        listener.bind(("127.0.0.1", 0))
        listener.listen()
    pid = os.fork()
    if pid == 0:  # the receiver: one thread per connection, until killed (or its parent dies)
        die_with_parent(signal.SIGKILL)  # a parent killed by SIGTERM takes this process along

        def drain(conn: socket.socket, wrap: bool) -> None:
            try:
                stream = server_context.wrap_socket(conn, server_side=True) if wrap else conn
                while stream.recv(65536):
                    pass
            except OSError:
                pass

        def accept(listener: socket.socket, wrap: bool) -> None:
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=drain, args=(conn, wrap), daemon=True).start()

        try:
            threading.Thread(target=accept, args=(plain, False), daemon=True).start()
            accept(tls, True)
        finally:
            os._exit(0)  # never back into the parent's code
    ports = plain.getsockname()[1], tls.getsockname()[1]
    plain.close()
    tls.close()
    return pid, *ports


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def per_send_us(send: Callable[[bytes], Awaitable[None]], sends: int) -> float:
    start = cpu_s()
    for _ in range(sends):
        await send(MESSAGE)
    return (cpu_s() - start) / sends * 1e6


async def measure(plain_port: int, tls_port: int, trust: ssl.SSLContext, sends: int, repeats: int) -> dict[str, float]:
    plain_peer = await trio.open_tcp_stream("127.0.0.1", plain_port)
    plain_ours = await trio.open_tcp_stream("127.0.0.1", plain_port)
    raw = plain_ours.socket._sock  # type: ignore[attr-defined]  # as ws_client.raw_socket does
    tls_peer = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", tls_port), trust, server_hostname="127.0.0.1")
    await tls_peer.do_handshake()
    tls_ours: TLSStream = await open_tls_stream("127.0.0.1", tls_port, ssl_context=trust)
    assert tls_peer.cipher() == tls_ours._tls.cipher(), "both TLS paths must negotiate the same cipher"

    async def raw_send(data: bytes) -> None:
        await _send_raw(raw, data)

    cases: dict[str, Callable[[bytes], Awaitable[None]]] = {
        "tcp peer": plain_peer.send_all,
        "tcp ours": raw_send,
        "tls peer": tls_peer.send_all,
        "tls ours": tls_ours.send_all,
    }
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for round_no in range(repeats + 1):
        for name, send in cases.items():  # interleaved, so drift hits every case alike
            figure = await per_send_us(send, sends)
            if round_no:
                rounds[name].append(figure)
    for stream in (plain_peer, plain_ours, tls_peer, tls_ours):
        await stream.aclose()
    return {name: statistics.median(values) for name, values in rounds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few sends and repeats (smoke test)")
    parser.add_argument("--sends", type=int, default=20000, help="sends per round (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (default 5; plus one warm-up)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON")
    args = parser.parse_args(argv)
    interrupt_on_sigterm()  # (SIGTERM, and SIGINT in a background job, as Ctrl-C: the receiver and its files go)
    if args.sends <= 0 or args.repeats <= 0:
        parser.error("--sends and --repeats must be positive")
    if args.quick:
        args.sends, args.repeats = min(args.sends, 500), min(args.repeats, 2)
    problem = check_output_path(args.json, "--json")
    if problem is not None:
        parser.error(problem)
    if importlib.util.find_spec("cryptography") is None:
        parser.error("needs the cryptography package (pip install cryptography) for its certificate")
    with tempfile.TemporaryDirectory() as folder:
        cert, key = make_certificate(Path(folder))
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)
        trust = ssl.create_default_context(cafile=str(cert))
        pid, plain_port, tls_port = start_receiver(server_context)
        try:
            print(f"measuring {args.repeats} x {args.sends} sends of {len(MESSAGE)} bytes per case ...", file=sys.stderr)
            figures = trio.run(measure, plain_port, tls_port, trust, args.sends, args.repeats)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    rows = [
        {"transport": "plain TCP", "peer": "trio.SocketStream.send_all", "peer_us": figures["tcp peer"],
         "ours": "socket.send (ws_client._send_raw)", "ours_us": figures["tcp ours"]},
        {"transport": "TLS", "peer": "trio.SSLStream.send_all", "peer_us": figures["tls peer"],
         "ours": "TLSStream.send_all (SSLObject)", "ours_us": figures["tls ours"]},
    ]
    for row in rows:
        row["ratio"] = row["peer_us"] / row["ours_us"]
    print_header(
        "bench/tls_send.py: CPU per provider-sized send, ours against Trio's streams",
        [("when", utc_now()), ("cpu", cpu_model()), ("python", sys.version.split()[0]), ("openssl", ssl.OPENSSL_VERSION),
         ("rounds", f"{args.repeats} x {args.sends} sends of {len(MESSAGE)} bytes, median (plus one warm-up)")],
    )
    columns = [
        Column("transport", "transport", align="<"),
        Column("peer", "peer", align="<"),
        Column("peer_us", "peer µs", ".1f"),
        Column("ours", "ours", align="<"),
        Column("ours_us", "ours µs", ".1f"),
        Column("ratio", "peer ÷ ours", ".2f"),
    ]
    print(render_table(
        "Table 1. Sender CPU per send_all",
        columns,
        rows,
        ["µs of CPU (user + system) in this process per send_all; the receiver runs in another process.",
         "peer ÷ ours > 1: ours is cheaper."],
    ))
    if args.json is not None:
        write_json(args.json, {"sends": args.sends, "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("tls_send: interrupted", file=sys.stderr)
        sys.exit(130)
