"""``mediaserver serve`` under SIGINT: it drains the calls it has (the listener open, /healthz 503), and a second
SIGINT stops it at once.  A real process, a real signal, a real call to the built-in echo agent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.fakes import fail_after, http_request
from tests.test_app import phone_call


def _free_port() -> int:
    with socket.socket() as probe:  # (the server refuses port 0)
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _start_serve(port: int, data_dir: Path, *, drain_s: str) -> trio.Process:
    """``mediaserver serve`` in a process of its own, on ``port``, with the built-in defaults (no keys)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIASERVER_", "TWILIO_"))}
    env.update(MEDIASERVER_DATA_DIR=str(data_dir), MEDIASERVER_DRAIN_S=drain_s)
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "mediaserver", "serve", "--host", "127.0.0.1", "--port", str(port), "--env-file", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


async def _wait_healthy(url: str) -> None:
    with trio.fail_after(20):
        while True:
            try:
                if (await http_request(url + "/healthz")).status == 200:
                    return
            except OSError:
                pass
            await trio.sleep(0.1)


@fail_after(40)
async def test_serve_drains_on_sigint_and_a_second_sigint_stops_it_now(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await _start_serve(port, tmp_path, drain_s="30")
    try:
        await _wait_healthy(url)
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            proc.send_signal(signal.SIGINT)
            await trio.sleep(0.5)
            assert proc.poll() is None  # draining: the call goes on (for up to 30 s)
            health = await http_request(url + "/healthz")
            assert health.status == 503 and json.loads(health.body)["status"] == "draining"
            await caller.send_silence(100)
            assert not caller.closed.is_set()
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(5):  # not the 30 s drain
                await proc.wait()
                await caller.closed.wait()
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(1 << 20)).decode()
    assert "SIGINT: draining calls" in err and "SIGINT again: stopping now" in err
    assert "Traceback" not in err


@fail_after(40)
async def test_serve_stops_on_sigint_with_a_client_that_reads_nothing(tmp_path: Path) -> None:
    """A client that pipelines requests and never reads their answers: Hypercorn's send waits on it, shielded from
    cancellation, and held the process's exit for ever; the connection's watch closes its socket at shutdown."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await _start_serve(port, tmp_path, drain_s="1")
    client = socket.socket()
    try:
        await _wait_healthy(url)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 500)
        await trio.sleep(1)  # the server's send to it is stuck now (its limit, 20 s, far away)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(8):  # drain 1 s, then what is left is closed
            await proc.wait()
        assert proc.returncode == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(1 << 20)).decode()
    assert "Traceback" not in err, err
