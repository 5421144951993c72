"""One state machine per ext_proc stream, and the parts it is made of.

``processor`` (the state machine: ``StreamProcessor``, its ``Phase``, the pass-through for
traffic that is not guarded), ``prompt`` (the request side), ``answer`` (non-streamed
answers), ``guard`` (the output guard of a streamed answer: hold and release whole events),
``channels`` (per-channel text and window planning), ``masking`` (masked text back onto the
pieces it arrived in), ``sinks`` (the outbox, the FULL_DUPLEX and STREAMED body sinks, the
keep-alive timer, the stream's own replies), ``context`` (what the parts share) and ``record``
(the typed facts of a stream: metadata, audit identity, metric labels).

Only ``processor``, ``prompt``, ``sinks`` touch Envoy messages, and only through
``extproc.envoy``. Nothing here imports boto3.
"""
