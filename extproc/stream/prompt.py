"""The request side of a guarded stream: read the prompt, check it, answer the held request.

``decode_body`` undoes the request's content-encoding within a size limit. ``PromptCheck`` is
one prompt's check with source INPUT: it runs beside the upstream call (``parallel``) or while
Envoy holds the request (``pre_call``), and turns the verdict into the prompt gate
(``Gate``), which the answer side waits on. The decision is ``extproc.domain.decision``'s.
Builds Envoy messages only through ``extproc.envoy``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any

from extproc import envoy
from extproc.domain.cache import image_key, verdict_key
from extproc.domain.client import Content, ImageBlock
from extproc.domain.decision import Action, decide_verdict
from extproc.domain.errors import GuardrailRejected
from extproc.domain.values import Gate, SignedPromptMask, Source, UncheckedImages
from extproc.domain.verdict import GuardrailVerdict, Outcome
from extproc.formats import ErrorKind, StreamFormat
from extproc.stream.context import StreamContext, as_guardrail_error
from extproc.stream.packing import pack, unpack

log = logging.getLogger(__name__)

HEADER_CONTENT_ENCODING = "content-encoding"


def decode_body(body: bytes, encoding: str, limit: int) -> bytes | None:
    """The request body without its content-encoding (gzip, deflate), at most ``limit`` bytes
    (0: no limit) once inflated; None when it cannot be read (unknown encoding, corrupt data,
    data after the compressed stream, a decompression bomb).

    A gzip body may be several members one after the other (RFC 1952 2.2): Python's ``gzip``,
    Go's ``gzip.Reader`` and Node's ``zlib.gunzip`` inflate them all and read the texts
    joined, so every member is inflated here too."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    out = bytearray()
    data = body
    while True:
        inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header, detected
        room = limit - len(out) if limit else 0
        if limit and room <= 0:
            return None  # another member after ``limit`` bytes (0 would mean "no limit")
        try:
            out += inflater.decompress(data, room)
        except zlib.error:
            if encoding != "deflate" or out:
                return None
            try:  # "deflate" is sometimes sent raw, without the zlib header
                inflater = zlib.decompressobj(wbits=-15)
                out += inflater.decompress(data, room)
            except zlib.error:
                return None
        if inflater.unconsumed_tail or not inflater.eof:
            return None
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if encoding == "deflate":
            return None  # one stream only: what follows it is not the body


class PromptCheck:
    """One prompt's check. ``held``: the request body Envoy holds until the verdict
    (``pre_call``), or None when the request already went upstream (``parallel``);
    ``decoded``: ``held`` was inflated, so a rewritten body goes out without its
    content-encoding.

    Texts the verdict cache knows to pass are not sent again; the others go in as few content
    blocks as their text units allow (``extproc.stream.packing``). ``images`` (decoded and
    sniffed, ``extproc.formats.prompt_images``) go in the same call after the text blocks, as
    image blocks (the guardrail client splits calls over Bedrock's per-call limits); an image
    the cache knows (by the SHA-256 of its bytes) is not sent again either. A clean pass of
    them all is remembered."""

    __slots__ = ("_ctx", "_fmt", "_texts", "_images", "held", "_decoded", "verdict", "_outputs",
                 "_signed", "refusal", "_mirrored", "_max_images")

    def __init__(self, ctx: StreamContext, fmt: StreamFormat, texts: list[str],
                 held: bytes | None, decoded: bool, signed: bool = False,
                 images: list[ImageBlock] | None = None, *, mirrored: bool = False,
                 max_images: int = 0) -> None:
        self._ctx = ctx
        self._fmt = fmt
        self._signed = signed  # the client signed the request (AWS SigV4): no rewriting
        # Headers carry the checked values again and are not rewritten (MCP ``Mcp-Param-*``):
        # a mask of the body would leave the original in them, so it is a block.
        self._mirrored = mirrored
        self._texts = texts
        self._images = images or []
        # Distinct images not known to the verdict cache one check may send (0: no limit):
        # each is a billed unit and a share of Bedrock's 25 images a second quota.
        self._max_images = max_images
        # The ``ErrorKind`` of a refusal that is not a guardrail block (images the guardrail
        # answered for without screening them, ``--unchecked-images reject``).
        self.refusal: str | None = None
        self.held = held
        self._decoded = decoded
        self.verdict: GuardrailVerdict | None = None
        self._outputs: list[str] | None = None  # per text, when the verdict masked
        ctx.gate = Gate.PENDING

    async def run(self) -> None:
        """Call the guardrail and set the gate; never raises but for cancellation."""
        ctx, record = self._ctx, self._ctx.record
        cache = ctx.verdict_cache
        keys = [verdict_key(ctx.route.guardrail, Source.INPUT, text) for text in self._texts]
        image_keys = [image_key(ctx.route.guardrail, Source.INPUT, image.data)
                      for image in self._images]
        known = await cache.lookup([*keys, *image_keys])  # one round trip to a shared store
        todo = [index for index, passed in enumerate(known[:len(keys)]) if not passed]
        if len(todo) < len(keys):
            record.count("cached_texts", len(keys) - len(todo))
        # Each distinct image once: copies of one image are one check (and one billed unit).
        unique = {key: image for key, image, passed
                  in zip(image_keys, self._images, known[len(keys):], strict=True) if not passed}
        images = list(unique.items())
        if self._max_images and len(images) > self._max_images:
            extra = len(images) - self._max_images
            route = ctx.route
            reject = route.unchecked_images is UncheckedImages.REJECT and not route.shadow
            ctx.images_unchecked("too_large", extra, rejected=reject)
            log.info("%d prompt images over --max-prompt-images: %s", extra,
                     "400" if reject else "passed unchecked")
            if reject:
                record.count("images", len(self._images))
                self.refusal = ErrorKind.IMAGE_TOO_LARGE
                record.input = "image_refused"
                ctx.gate = Gate.BLOCKED
                return
            images = images[:self._max_images]
        if self._images:
            record.count("images", len(self._images))
            if len(images) < len(self._images):
                record.count("cached_images", len(self._images) - len(images))
        if not todo and not images:
            record.input = Outcome.PASS.value
            ctx.gate = Gate.OPEN
            return
        texts = [self._texts[index] for index in todo]
        packed = pack(texts)
        content: list[Content] = [*packed.blocks, *(image for _, image in images)]
        try:
            verdict = await ctx.check(Source.INPUT, content)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - GuardrailError, or a bug: never hang the request
            error = as_guardrail_error(exc, "the prompt check")
            record.input = f"error:{error.error_class}"
            if images and isinstance(error, GuardrailRejected):
                # Bedrock refused a call holding images (one it cannot read: a PNG whose
                # pixels do not inflate passes our header checks). That is an image the
                # guardrail cannot be given, not an outage: --unchecked-images decides, never
                # the failure mode (a crafted image would otherwise release an open route).
                route = ctx.route
                if route.unchecked_images is UncheckedImages.REJECT and not route.shadow:
                    ctx.images_unchecked("unreadable", len(images), rejected=True)
                    log.warning("the guardrail refused a call holding %d prompt images: 400",
                                len(images))
                    self.refusal = ErrorKind.IMAGE_UNREADABLE
                    record.input = "image_refused"
                    ctx.gate = Gate.BLOCKED
                    return
            if ctx.no_verdict(error) is Action.RELEASE_UNCHECKED:
                log.warning("prompt check failed (%s); failure mode open", error.error_class)
                ctx.gate = Gate.OPEN
            else:
                log.warning("prompt check failed (%s); failure mode closed", error.error_class)
                ctx.gate = Gate.FAILED
            return
        self.verdict = verdict
        record.input = verdict.outcome.value
        record.count("text_units", verdict.text_units)
        unguarded = 0
        if images and verdict.images_guarded is not None:
            unguarded = max(0, len(images) - verdict.images_guarded)
        if unguarded and verdict.outcome is not Outcome.BLOCK:
            # The guardrail answered without screening them (its content filters do not have
            # the image modality on): they are unchecked images.
            route = ctx.route
            reject = route.unchecked_images is UncheckedImages.REJECT and not route.shadow
            ctx.images_unchecked("not_guarded", unguarded, rejected=reject)
            log.warning("the guardrail did not screen %d of %d prompt images: %s", unguarded,
                        len(images), "400" if reject else "passed unchecked")
            if reject:
                self.refusal = ErrorKind.IMAGE_NOT_GUARDED
                record.input = "image_not_guarded"
                ctx.gate = Gate.BLOCKED
                return
        if verdict.outcome is Outcome.PASS and not verdict.findings:
            cache.remember([*(keys[index] for index in todo),
                            *(key for key, _ in images if not unguarded)], verdict.text_units)
        outcome = verdict.outcome
        can_mask = self.held is not None
        if outcome is Outcome.MASK and can_mask and self._signed and not ctx.route.shadow:
            # A rewritten body would fail the client's signature upstream.
            can_mask = False
            if ctx.route.signed_prompt_mask is SignedPromptMask.PASS:
                record.signed_mask = "passed"
                log.warning("prompt masked by the guardrail on a SigV4-signed request: sent "
                            "unmasked (signed_prompt_mask pass)")
            else:
                record.signed_mask = "refused"
                log.warning("prompt masked by the guardrail on a SigV4-signed request: "
                            "refused (a rewritten body would fail the signature; sign in "
                            "Envoy after the sidecar to allow masking)")
                outcome = Outcome.BLOCK
        if outcome is Outcome.MASK and can_mask and self._mirrored and not ctx.route.shadow:
            log.warning("prompt masked by the guardrail on an MCP request whose Mcp-Param "
                        "headers carry its arguments again: refused (they would still carry "
                        "the original)")
            outcome = Outcome.BLOCK
        if outcome is Outcome.MASK and can_mask:
            masked = verdict.outputs
            if images and len(masked) == len(packed.blocks) + len(images):
                # An output for each image block too (after the texts, as they were sent).
                masked = masked[:len(packed.blocks)]
            outputs = unpack(packed, texts, masked)
            if outputs is None:
                # A masked span across two texts cannot be put back, and the held request
                # must not go up unmasked: a mask that cannot be applied is a block.
                log.warning("masked prompt texts cannot be split back: blocked")
                outcome = Outcome.BLOCK
            else:
                full = list(self._texts)
                for index, output in zip(todo, outputs, strict=True):
                    full[index] = output
                self._outputs = full
        decision = decide_verdict(outcome, ctx.route, can_mask=can_mask,
                                  can_soft_block=False)
        if decision.audit is not None:
            ctx.intervened(Source.INPUT, decision.audit, verdict)
        if decision.would == "block":
            record.would_block_input = True
            log.info("shadow: the prompt would have been blocked")
        elif decision.action is Action.BLOCK:
            log.info("prompt blocked by the guardrail")
            ctx.gate = Gate.BLOCKED
            return
        ctx.gate = Gate.OPEN

    def held_answer(self, scope: str) -> Any:
        """``pre_call``, the prompt passed: the answer that lets the held request go upstream,
        with the masked prompt in place of the original when the guardrail masked it; None
        when the masked prompt cannot be put into the body (the caller blocks: sending the
        original would let the masked text through)."""
        assert self.held is not None, "BUG: no request body is held"
        verdict = self.verdict
        if verdict is not None and verdict.outcome is Outcome.MASK and self._outputs is not None:
            rewritten = self._fmt.rewrite_prompt(self.held, scope, self._outputs)
            if rewritten is None:
                log.warning("masked prompt could not be put back into the request: blocked")
                return None
            self._ctx.record.input_masked = True
            return envoy.replace_request_body(
                rewritten, remove_headers=(HEADER_CONTENT_ENCODING,) if self._decoded else ())
        return envoy.continue_request_body()
