"""The gateway's parts on their own: admission arithmetic, bounded log lines, request ids, body headers."""

from __future__ import annotations

import logging

import pytest

from gateway.admission import Admission, OverCapacity
from gateway.headers import check_body_headers, request_id
from gateway.logs import MAX_LINE_BYTES, BoundedRecords, JsonFormatter, RepeatLimit
from gateway.protocol import RequestError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_refuses_what_would_finish_after_the_deadline():
    clock = Clock()
    admission = Admission(deadline_s=10.0, clock=clock)
    assert admission.decide(1000).admit  # nothing measured yet: admitted
    admission.started(100)
    clock.now = 10.0
    admission.finished(100, answered=True)  # 10 rows/s
    assert admission.rate() == pytest.approx(10.0)
    assert admission.decide(1000).admit  # nothing queued: always admitted
    admission.started(80)
    assert admission.decide(20).admit  # (80 + 20) / 10 = 10 s: just in time
    refused = admission.decide(40)
    assert not refused.admit and refused.expected_s == pytest.approx(12.0) and refused.retry_after_s == 2
    with pytest.raises(OverCapacity, match="past the 10 s deadline"):
        admission.check(40)
    clock.now = 14.0
    admission.finished(80, answered=False)  # failed rows do not count for the rate
    assert admission.rows_in_flight == 0


def record(message: str, **extra) -> logging.LogRecord:
    entry = logging.LogRecord("embcap.gateway", logging.WARNING, __file__, 1, "%s", (message,), None)
    entry.__dict__.update(extra)
    return entry


def test_every_log_line_fits_whatever_the_input():
    formatter = JsonFormatter()
    for text in ("x" * 10_000_000, "\u00e9\u4e2d" * 500_000, "'a', " * 200_000):
        line = formatter.format(record(f"request failed: {text}", request_id="r" * 5000, route=text))
        assert len(line.encode()) <= MAX_LINE_BYTES
    foreign = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "%s", ("y" * 100_000,), None)
    BoundedRecords().filter(foreign)
    assert len(logging.Formatter().format(foreign)) <= MAX_LINE_BYTES


def test_repeated_lines_are_held_back_and_counted():
    limit = RepeatLimit(interval_s=60)
    same = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource\nx",
                              None, None) for _ in range(100)]
    assert [limit.filter(r) for r in same].count(True) == 1
    assert limit.filter(record("a request", request_id="abc"))  # one line per request is never held back


def test_request_ids_are_validated_or_replaced():
    assert request_id({"x-request-id": "req-ok-1"}) == ("req-ok-1", False)
    for bad in ("r" * 129, "a b", "<script>", "\u00e9"):
        given, replaced = request_id({"x-request-id": bad})
        assert replaced and given != bad and len(given) == 32
    assert request_id({})[1] is False


@pytest.mark.parametrize(("headers", "code"), [
    ({"content-encoding": "gzip"}, "unsupported_content_encoding"),
    ({"content-type": "application/json; charset=utf-16"}, "unsupported_charset"),
    ({"content-type": "text/plain"}, "unsupported_media_type"),
])
def test_body_headers_other_than_utf8_json_are_415(headers, code):
    with pytest.raises(RequestError) as refused:
        check_body_headers(headers)
    assert refused.value.status == 415 and refused.value.code == code
    check_body_headers({"content-type": "application/json; charset=UTF-8", "content-encoding": "identity"})


def test_large_bodies_are_refused_by_a_scan_before_any_parse():
    from gateway.protocol import Limits, decode_values

    numbers = b"0.1234567, " * 200_000  # 2.2 MB: above the scan's threshold
    with pytest.raises(RequestError, match="contains NaN"):
        decode_values(b'{"embedding": [' + numbers + b"NaN]}")
    with pytest.raises(RequestError, match="batch of about 195 rows exceeds the limit of 4"):
        decode_values(b'{"embedding": [' + numbers + b"1]}", Limits(max_rows=4))
    with pytest.raises(RequestError, match=r"\[200000\] is str"):  # what the scan cannot name, the parse does
        decode_values(b'{"embedding": [' + numbers + b'"x"]}')
    assert len(decode_values(b'{"embedding": [' + numbers + b"1]}")) == 200_001


def test_paired_writes_send_a_head_with_its_body_and_lose_nothing():
    """The transport under the gateway's HTTP protocol (gateway.connections.PairedWrites), on a real socket pair:
    two writes in one turn of the loop go out in one send; a lone write goes out on the next turn; closing sends
    what is held before the end of the stream."""
    import asyncio
    import socket

    from gateway.connections import PairedWrites

    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        sends: list[bytes] = []
        real_write = transport.write
        transport.write = lambda data: (sends.append(bytes(data)), real_write(data))  # count the real sends
        paired = PairedWrites(transport, loop)
        paired.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        paired.write(b"ok")  # the same turn: one send
        assert sends == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        paired.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # alone: held until the next turn
        assert len(sends) == 1 and not paired.is_closing()  # anything else is the transport's own
        await asyncio.sleep(0)
        assert sends[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        paired.write(b"last words")
        paired.close()  # sent before the close, not dropped
        received = b""
        while True:
            chunk = await loop.sock_recv(theirs, 1024)
            if not chunk:
                break
            received += chunk
        theirs.close()
        return [received, *sends]

    received, *sends = asyncio.run(scenario())
    assert received == b"".join(sends) and received.endswith(b"last words") and len(sends) == 3
