#!/usr/bin/env python3
"""CPU cost of the image path of a prompt, per MB of image, without gRPC or Envoy.

    python bench/images.py [--sizes 64,512,1024,3900] [--repeat 20] [--format png|jpeg|both]

For one Chat request holding a ``data:`` URL image of each size (KiB of image bytes;
incompressible PNG, or a JPEG padded with a comment segment), it measures with
``time.process_time``, interleaved so that every stage sees the same machine:

* ``old``: what the sidecar did before images were checked: parse the request
  (``formats.strict.parse_request``) and read its prompt texts (``prompt_texts``, which skips
  the data URL);
* ``find``: find the image parts in the parsed request (``prompt_images.find_images``);
* ``decode``: the data URL to bytes (``images.parse_data_url``: base64, bounded);
* ``inspect``: sniff, dimensions, the PNG chunk walk with CRCs (``images.inspect``);
* ``key``: the verdict-cache key (SHA-256 of the bytes);
* ``call``: the bytes as the ApplyGuardrail request carries them: base64 in botocore's JSON
  body (in-process calls), plus base64 again for the call-process wire (``--guardrail-calls
  process``, the default: ``wire.encode_content`` and the child's ``decode_content``);
* ``new``: ``old`` + every stage above, the whole added path.

and reports µs per request and ms of CPU per MB of image for each, and ``new`` / ``old``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import struct
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

from extproc.domain.cache import image_key
from extproc.domain.client import ImageBlock
from extproc.domain.values import GuardrailRef, Source
from extproc.formats.openai_chat import OpenAIChat
from extproc.formats.prompt_images import find_images, resolve
from extproc.formats.strict import parse_request
from extproc.guardrail.wire import decode_content, encode_content
from extproc.images import inspect, parse_data_url
from testkit.images import jpeg

GUARDRAIL = GuardrailRef("benchguardrail", "1")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def noisy_png(size: int) -> bytes:
    """A valid PNG of about ``size`` bytes whose pixels are random (stored, not deflated)."""
    width = 1024
    height = max(1, size // (width + 1))
    rows = b"".join(b"\x00" + os.urandom(width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                                0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows, 0)) + _chunk(b"IEND", b""))


def request_with(image: bytes, media_type: str) -> bytes:
    url = f"data:{media_type};base64,{base64.b64encode(image).decode()}"
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture? Describe it in two sentences."},
        {"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def stages(body: bytes) -> dict[str, Callable[[], Any]]:
    fmt = OpenAIChat()
    request = parse_request(body)
    (part,) = find_images(request)
    data = parse_data_url(part.value)
    found = inspect(data)
    block = ImageBlock(found.format, found.data)

    def old() -> Any:
        return fmt.prompt_texts(body, "whole_request"), parse_request(body)

    def call() -> Any:
        wire = json.dumps(encode_content([block]))  # parent -> child frame
        (sent,) = decode_content(json.loads(wire))
        assert isinstance(sent, ImageBlock)
        return base64.b64encode(sent.data)  # botocore's blob serialization

    def new() -> Any:
        texts = fmt.prompt_texts(body, "whole_request")
        parsed = parse_request(body)
        blocks = []
        for item in find_images(parsed):
            image = resolve(item)
            blocks.append(ImageBlock(image.format, image.data))
            image_key(GUARDRAIL, Source.INPUT, image.data)
        wire = json.dumps(encode_content(blocks))
        for sent in decode_content(json.loads(wire)):
            if isinstance(sent, ImageBlock):
                base64.b64encode(sent.data)
        return texts

    return {
        "old": old,
        "find": lambda: find_images(request),
        "decode": lambda: parse_data_url(part.value),
        "inspect": lambda: inspect(data),
        "key": lambda: image_key(GUARDRAIL, Source.INPUT, data),
        "call": call,
        "new": new,
    }


def measure(runs: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """CPU seconds per run of each stage, the stages taking turns ``repeat`` times."""
    totals = dict.fromkeys(runs, 0.0)
    for _ in range(repeat):
        for name, run in runs.items():
            started = time.process_time()
            run()
            totals[name] += time.process_time() - started
    return {name: total / repeat for name, total in totals.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,512,1024,3900", help="image sizes in KiB")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--format", choices=("png", "jpeg", "both"), default="both")
    args = parser.parse_args(argv)
    print("command: python bench/images.py " + shlex.join(argv))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; CPU time "
          "(time.process_time), mean of --repeat runs, stages interleaved")
    formats = ("png", "jpeg") if args.format == "both" else (args.format,)
    names = ("old", "find", "decode", "inspect", "key", "call", "new")
    print(f"{'image':>14} {'body KiB':>9} " + " ".join(f"{n:>9}" for n in names)
          + f" {'new/old':>8}   (µs per request)")
    per_mb: dict[str, list[float]] = {n: [] for n in names}
    for fmt in formats:
        for kib in (int(s) for s in args.sizes.split(",")):
            image = noisy_png(kib * 1024) if fmt == "png" else jpeg(64, 64, padding=kib * 1024)
            body = request_with(image, f"image/{fmt}")
            result = measure(stages(body), args.repeat)
            mb = len(image) / 1e6
            for name in names:
                per_mb[name].append(result[name] * 1000 / mb)
            print(f"{fmt + ' ' + str(kib) + ' KiB':>14} {len(body) / 1024:>9.0f} "
                  + " ".join(f"{result[n] * 1e6:>9.0f}" for n in names)
                  + f" {result['new'] / result['old']:>8.2f}")
    print("ms of CPU per MB of image (mean over the sizes and formats above):")
    print("  " + "  ".join(f"{n} {sum(v) / len(v):.2f}" for n, v in per_mb.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
