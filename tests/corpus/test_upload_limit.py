"""A 1 GB calibration upload, streamed with chunked encoding (no Content-Length) to a real uvicorn
server: 413 once past the limit, the server's memory never holds the body, nothing is kept."""

from __future__ import annotations

import select
import socket
from pathlib import Path

import pytest

from tests.reliability.harness import TOKENS, Cluster, rss_kb

pytestmark = pytest.mark.integration
GB = 1 << 30
CHUNK = 1 << 20


def stream_upload(port: int, total: int, token: str) -> tuple[int, int, bytes]:
    """POST `total` bytes of JSONL in 1 MiB chunks; stop as soon as the server answers.
    Returns (status, bytes sent, response head)."""
    line = b'{"text": "' + b"x" * 500 + b'"}\n'
    chunk = (line * (CHUNK // len(line) + 1))[:CHUNK]
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(b"POST /v1/calibration-sets HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + token.encode()
              + b"\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = 0
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    try:
        while sent < total:
            if select.select([s], [], [], 0)[0]:  # the server answered early
                break
            s.sendall(frame)
            sent += len(chunk)
        else:
            s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading: its answer is waiting
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(65536)
        if not data:
            break
        head += data
    s.close()
    return int(head.split(b" ", 2)[1]), sent, head


def test_one_gigabyte_streamed_upload_is_refused_without_buffering(tmp_path: Path):
    c = Cluster(tmp_path)  # the API alone (no broker needed for uploads), default 64 MB limit
    try:
        c.migrate()
        c.start_api()
        pid = c.procs["api"].pid
        before = rss_kb(pid)
        status, sent, head = stream_upload(c.api_port, GB, TOKENS["acme"])
        peak = rss_kb(pid, "VmHWM")
        assert status == 413, head
        assert sent < GB  # refused on the way, not after the whole gigabyte
        assert (peak - before) < 32 * 1024, f"the API grew by {(peak - before) // 1024} MiB"
        assert not list((c.data / "calibration").rglob("*.jsonl"))  # the partial file is gone
        assert c.http.get("/v1/calibration-sets").json()["data"] == []
        print(f"\nRELIABILITY upload: sent={sent >> 20} MiB before 413, API peak growth {(peak - before) >> 10} MiB")
    finally:
        c.close()
