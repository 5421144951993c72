"""Requests sent exactly as written: the path byte for byte (no client normalizes a dot segment
or an escape away), the body as given, over HTTP/1.1 (``http.client``) or HTTP/2 with prior
knowledge (``h2``), optionally with request trailers."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

Headers = Sequence[tuple[str, str]]


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def http1(port: int, method: str, path: str, headers: Headers, body: bytes,
          chunked: bool = False, trailers: Headers = (), timeout: float = 30.0) -> Answer:
    """One request over HTTP/1.1; ``chunked``: the body in chunks of at most 64 bytes, without
    a content-length, then ``trailers`` after the last chunk."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if not chunked:
            connection.putheader("content-length", str(len(body)))
            connection.endheaders(body)
        else:
            connection.putheader("transfer-encoding", "chunked")
            connection.endheaders()
            for at in range(0, len(body), 64):
                piece = body[at:at + 64]
                connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            tail = b"".join(f"{name}: {value}\r\n".encode() for name, value in trailers)
            connection.send(b"0\r\n" + tail + b"\r\n")
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                      response.read())
    finally:
        connection.close()


def http2(port: int, method: str, path: str, headers: Headers, body: bytes,
          trailers: Headers = (), timeout: float = 30.0) -> Answer:
    """One request over h2c; with ``trailers``, they follow the body (END_STREAM on them)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", method), (":scheme", "http"), (":authority", "llm"),
                               (":path", path), *headers])
    conn.send_data(stream, body, end_stream=not trailers)
    if trailers:
        conn.send_headers(stream, list(trailers), end_stream=True)
    sock.sendall(conn.data_to_send())
    answer = Answer(0)
    ended = False
    try:
        while not ended:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = {bytes(k).decode(): bytes(v).decode()
                                      for k, v in event.headers}
                    answer.status = int(answer.headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return answer
