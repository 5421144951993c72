"""The model text of one streamed answer, per channel, and the windows the next check covers.

A *channel* is one independent stream of text (a choice's content, a tool call's arguments, a
content block). The guard appends each event's text to its channels (``Channels.add``), and
keeps, per channel, how far passing checks covered the text (``checked``) and how far events
may be released (``limit``). ``Channels.plan_windows`` and ``plan_cumulative`` cut the text
not yet checked into the content blocks of the next call (``extproc.domain.windows`` says what
they cost). The events themselves, and what each holds of which channel, are ``Held`` and
``Delta`` values. No I/O; positions are character offsets in one channel's text.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from extproc.domain.windows import Block, WindowPolicy, held_tail
from extproc.sse import SSEEvent


@dataclass(slots=True)
class Delta:
    """The text one event holds of one channel."""

    channel: int
    start: int
    text: str
    # The text to release for it, piece by piece (masking may change it); None until mapped: a
    # list per held event would be one more object for every garbage collection to walk.
    mapped: list[str] | None = None
    mapped_to: int = -1  # original position up to which ``mapped`` is filled; -1: not mapped


@dataclass(slots=True)
class Held:
    """An event held back from the client: its bytes, parsed form and text."""

    raw: bytes
    event: SSEEvent | None
    chars: int  # characters of model text in it (0: an event without text)
    # Sync only, where ``mapped`` text must be tracked: that text's place in its channels.
    deltas: Sequence[Delta]


class Channel:
    """One stream of model text (a choice's content, a tool call's arguments)."""

    __slots__ = ("key", "length", "checked", "limit", "mask_from", "_base", "_buf", "_tail",
                 "keep_all", "last")

    def __init__(self, key: Hashable, keep_all: bool) -> None:
        self.key = key
        self.length = 0
        self.checked = 0  # text covered by passing checks
        self.limit = 0  # events whose text ends at or before this may be released
        self.mask_from = 0  # where the next masked region starts (after a carried span)
        self.keep_all = keep_all
        # The last passing check of this channel: (block, original text, text to release).
        self.last: tuple[Block, str, str] | None = None
        self._base = 0
        self._buf = ""
        self._tail: list[str] = []

    def append(self, text: str) -> int:
        start = self.length
        self._tail.append(text)
        self.length += len(text)
        return start

    def slice(self, start: int, end: int) -> str:
        if self._tail:
            self._buf += "".join(self._tail)
            self._tail.clear()
        return self._buf[start - self._base:end - self._base]

    def trim(self, keep_from: int) -> None:
        """Forget text before ``keep_from`` (windows never look back further)."""
        if self.keep_all or keep_from <= self._base:
            return
        if self._tail:
            self._buf += "".join(self._tail)
            self._tail.clear()
        self._buf = self._buf[keep_from - self._base:]
        self._base = keep_from


class Channels:
    """Every channel of one answer, in the order they appeared."""

    __slots__ = ("all", "_index", "_keep_all")

    def __init__(self, keep_all: bool) -> None:
        self.all: list[Channel] = []
        self._index: dict[Hashable, int] = {}
        self._keep_all = keep_all  # the cumulative strategy re-reads the whole text

    def add(self, key: Hashable, text: str) -> tuple[int, int]:
        """Append ``text`` to the channel ``key`` (new ones are created); returns the channel's
        index and where the text starts in it."""
        index = self._index.get(key)
        if index is None:
            index = len(self.all)
            self._index[key] = index
            self.all.append(Channel(key, keep_all=self._keep_all))
        return index, self.all[index].append(text)

    def index_of(self, key: Hashable) -> int:
        return self._index[key]

    def pending(self) -> int:
        """Characters no passing check covered yet, over every channel."""
        pending = 0
        for channel in self.all:  # (once per chunk: a loop is cheaper than sum())
            pending += channel.length - channel.checked
        return pending

    def first_releasable(self, overlap: int) -> bool:
        """Some channel holds text a first window would release: more than its held tail
        (``held_tail``, at most ``overlap``)."""
        for channel in self.all:
            if channel.length > channel.checked:
                pending = channel.slice(channel.checked, channel.length)
                if min(held_tail(pending), overlap) < len(pending):
                    return True
        return False

    def all_checked(self) -> bool:
        return all(c.checked >= c.length for c in self.all)

    def texts(self, blocks: Sequence[Block]) -> list[str]:
        return [self.all[b.channel_index].slice(b.start, b.end) for b in blocks]

    def plan_cumulative(self) -> list[Block]:
        """One block per channel with new text: the whole text so far."""
        return [Block(i, 0, c.checked, c.length) for i, c in enumerate(self.all)
                if c.length > c.checked]

    def plan_windows(self, policy: WindowPolicy) -> list[Block]:
        """One block per channel with new text: up to ``window_chars`` of it after up to
        ``overlap_chars`` already checked (never before what was released)."""
        blocks = []
        span = policy.window_chars + policy.overlap_chars
        for index, channel in enumerate(self.all):
            if channel.length <= channel.checked:
                continue
            start = max(0, min(channel.limit, channel.checked - policy.overlap_chars))
            end = min(channel.length, max(start + span, channel.checked + 1))
            blocks.append(Block(index, start, channel.checked, end))
        return blocks
