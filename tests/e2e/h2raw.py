"""A bare HTTP/2 client (``h2``) for what httpx cannot send: request trailers."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False  # END_STREAM seen (not a reset)
    reset: bool = False


def post_with_trailers(port: int, path: str, headers: list[tuple[str, str]], body: bytes,
                       trailers: list[tuple[str, str]], timeout: float = 30.0) -> H2Answer:
    """POST ``body`` with request ``trailers`` (h2c, prior knowledge) and read the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"),
                               (":authority", "llm"), (":path", path), *headers])
    conn.send_data(stream, body)
    conn.send_headers(stream, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    answer = H2Answer()
    try:
        while not (answer.ended or answer.reset):
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = {k.decode(): v.decode() for k, v in event.headers}
                    answer.status = int(answer.headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    answer.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return answer
