"""Writes tests/corpus/*.sse: ``python tests/corpus/make_corpus.py`` (deterministic).

The files are committed; rerun only to change them. Every text-bearing file carries the word
``harbour`` whole in one delta per channel: ``test_hostile.py`` replaces it with a blocked phrase
for the "ends with one error frame" variant.
"""
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent
HEAD = {"id": "chatcmpl-corpus", "object": "chat.completion.chunk", "created": 1700000000, "model": "demo"}
TEXT = ("Lighthouses stood on rocky headlands for centuries. Keepers trimmed the wicks, wound the "
        "clockwork and logged the weather. When fog rolled in they sounded horns for hours. Ships "
        "steered by the light into the harbour at last, and the keepers slept at dawn. ")

def chunk(content=None, role=None, finish=None, **extra):
    delta = {}
    if role is not None: delta["role"] = role
    if content is not None: delta["content"] = content
    obj = dict(HEAD, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
    obj.update(extra)
    return obj

def js(obj, ascii_=False):
    return json.dumps(obj, ensure_ascii=ascii_, separators=(",", ":"))

def pieces(text, n):
    """Cut ``text`` every ``n`` characters, keeping each "harbour" whole in one piece (the word
    the injected variants replace with a blocked phrase)."""
    out = []
    for part in re.split("(harbour)", text):
        if part == "harbour":
            out.append(part)
        elif part:
            out += [part[i:i + n] for i in range(0, len(part), n)]
    return out

def std_events(text=TEXT, n=9, eol="\n"):
    evs = [f"data: {js(chunk('', role='assistant'))}{eol}{eol}"]
    evs += [f"data: {js(chunk(p))}{eol}{eol}" for p in pieces(text, n)]
    evs += [f"data: {js(chunk(finish='stop'))}{eol}{eol}", f"data: [DONE]{eol}{eol}"]
    return evs

files = {}
files["lf_plain.sse"] = "".join(std_events())
files["crlf.sse"] = "".join(std_events(eol="\r\n"))
files["cr_only.sse"] = "".join(std_events(eol="\r"))
# mixed line endings, one per event, including a CRLF whose CR and LF are separate lines of
# intent: "\r" then "\n" can look like a blank line to a naive splitter
evs = std_events()
mixed = []
for i, e in enumerate(evs):
    eol = ["\n", "\r\n", "\r"][i % 3]
    mixed.append(e.replace("\n", eol))
files["mixed_eol.sse"] = "".join(mixed)
files["comments_only.sse"] = "".join(f": ping {i}\n\n" for i in range(40)) + ":\n\n: \n\n"
files["bom.sse"] = "\ufeff" + "".join(std_events())
# multi-line data: the JSON of each event split over several data: lines (joined with \n, which
# JSON treats as whitespace)
ml = [f"data: {js(chunk('', role='assistant'))}\n\n"]
for p in pieces(TEXT, 23):
    s = js(chunk(p))
    cut1, cut2 = s.index('"choices"'), s.index('"delta"')
    ml.append(f"data: {s[:cut1]}\ndata: {s[cut1:cut2]}\ndata:{s[cut2:]}\n\n")
ml += [f"data: {js(chunk(finish='stop'))}\n\n", "data: [DONE]\n\n"]
files["multiline_data.sse"] = "".join(ml)
# id / retry / event fields
ir = ["retry: 3000\n\n", f"id: 0\nevent: message\ndata: {js(chunk('', role='assistant'))}\n\n"]
for i, p in enumerate(pieces(TEXT, 11), 1):
    ir.append(f"id: evt-{i}\nretry: {1000 + i}\ndata: {js(chunk(p))}\n\n" if i % 2 else
              f"event: message\nid: {i}\ndata: {js(chunk(p))}\nretry: x{i}\n\n")
ir += [f"id:\ndata: {js(chunk(finish='stop'))}\n\n", "id: last\ndata: [DONE]\n\n"]
files["id_retry.sse"] = "".join(ir)
# emoji, CJK, combining marks, ZWJ sequences, RTL, astral plane; non-ASCII written raw (UTF-8)
emoji_text = ("Caf\u00e9 \u65e5\u672c\u8a9e \U0001f642\U0001f3f3\ufe0f\u200d\U0001f308 "
              "\U0001f468\u200d\U0001f469\u200d\U0001f467 e\u0301 \u05e9\u05dc\u05d5\u05dd "
              "\U0001d54f\U0001f600 ") * 3 + TEXT
files["emoji.sse"] = "".join(std_events(emoji_text, n=5))
# the same, \u-escaped (ASCII JSON with surrogate pairs split across events is NOT valid JSON,
# so each event stays whole: escapes only)
ee = [f"data: {js(chunk('', role='assistant'), True)}\n\n"]
ee += [f"data: {js(chunk(p), True)}\n\n" for p in pieces(emoji_text, 7)]
ee += [f"data: {js(chunk(finish='stop'))}\n\n", "data: [DONE]\n\n"]
files["emoji_escaped.sse"] = "".join(ee)
# enormous events: a 256 KiB non-text field, a 6,000-character content delta, a 64 KiB comment
big = [f"data: {js(chunk('', role='assistant'))}\n\n",
       f"data: {js(chunk('Opening words. ', system_fingerprint='fp_' + 'x' * 262144))}\n\n",
       ": " + "c" * 65536 + "\n\n",
       f"data: {js(chunk((TEXT.replace('harbour', 'port') * 30)[:6000]))}\n\n"]
big += [f"data: {js(chunk(p))}\n\n" for p in pieces(TEXT, 40)]
big += [f"data: {js(chunk(finish='stop'))}\n\n", "data: [DONE]\n\n"]
files["enormous_events.sse"] = "".join(big)
# empty data: "data:" with empty value, "data" without a colon, empty content, blank-line runs
ed = [f"data: {js(chunk('', role='assistant'))}\n\n", "data:\n\n", "data\n\n", "\n\n\n\n",
      f"data: {js(chunk(''))}\n\n", "data: \n\n"]
for i, p in enumerate(pieces(TEXT, 13)):
    ed.append(f"data: {js(chunk(p))}\n\n")
    if i % 5 == 0:
        ed.append(["data:\n\n", "\n\n", f"data: {js(chunk(''))}\n\n", "data\ndata\n\n", "data: {}\n\n"][i // 5 % 5])
ed += [f"data: {js(chunk(finish='stop'))}\n\n", "data: [DONE]\n\n"]
files["empty_data.sse"] = "".join(ed)
# fields nobody knows, odd spacing, colon-less lines, an empty event name
uf = [f"data: {js(chunk('', role='assistant'))}\n\n"]
for i, p in enumerate(pieces(TEXT, 17)):
    uf.append([f"foo: bar\ndata: {js(chunk(p))}\n\n", f"data:{js(chunk(p))}\n\n",
               f"event:\ndata:  {js(chunk(p))}\n\n", f"x-custom\ndata: {js(chunk(p))}\n: note\n\n",
               f"Data: ignored\ndata: {js(chunk(p))}\n\n"][i % 5])
uf += [f"data: {js(chunk(finish='stop'))}\n\n", "data: [DONE]\n\n"]
files["unknown_fields.sse"] = "".join(uf)
# no terminating blank line after the last event (the spec dispatches nothing for it)
files["unterminated_tail.sse"] = "".join(std_events())[:-1]
# many blank lines and comments before the first event; keep-alive comments between
lb = "\n" * 50 + ": hello\n\n" + "".join(e + (": keep-alive\n\n" if i % 4 == 0 else "")
                                          for i, e in enumerate(std_events()))
files["leading_blanks_comments.sse"] = lb
# tool calls: the arguments carry the text
tc = [f"data: {js(dict(HEAD, choices=[{'index': 0, 'delta': {'role': 'assistant', 'content': None, 'tool_calls': [{'index': 0, 'id': 'call_1', 'type': 'function', 'function': {'name': 'log_note', 'arguments': ''}}]}, 'logprobs': None, 'finish_reason': None}]))}\n\n"]
args = json.dumps({"note": TEXT})
for p in pieces(args, 8):
    tc.append(f"data: {js(dict(HEAD, choices=[{'index': 0, 'delta': {'tool_calls': [{'index': 0, 'function': {'arguments': p}}]}, 'logprobs': None, 'finish_reason': None}]))}\n\n")
tc += [f"data: {js(chunk(finish='tool_calls'))}\n\n", "data: [DONE]\n\n"]
files["tool_calls.sse"] = "".join(tc)
# two choices interleaved (n=2)
two = [f"data: {js(dict(HEAD, choices=[{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None, 'finish_reason': None}]))}\n\n" for i in (0, 1)]
for p in pieces(TEXT, 10):
    for i in (0, 1):
        two.append(f"data: {js(dict(HEAD, choices=[{'index': i, 'delta': {'content': p}, 'logprobs': None, 'finish_reason': None}]))}\n\n")
two += [f"data: {js(dict(HEAD, choices=[{'index': i, 'delta': {}, 'logprobs': None, 'finish_reason': 'stop'}]))}\n\n" for i in (0, 1)]
two.append("data: [DONE]\n\n")
files["two_choices.sse"] = "".join(two)
# usage chunk with empty choices, null fields, events after [DONE]
us = std_events()[:-1] + [f"data: {js(dict(HEAD, choices=[], usage={'prompt_tokens': 5, 'completion_tokens': 60, 'total_tokens': 65}))}\n\n",
                          f"data: {js(dict(HEAD, choices=None))}\n\n", "data: [DONE]\n\n",
                          ": after done\n\n", "data: [DONE]\n\n"]
files["usage_and_after_done.sse"] = "".join(us)

for name, text in files.items():
    (OUT / name).write_bytes(text.encode("utf-8"))
    print(name, len(text.encode()), "harbour" in text)
