"""A judge upstream: FastAPI on uvicorn, standing in for an LLM API server built on that stack
(vLLM, LiteLLM) and recording what its model would read.

The routes are registered the way such a server registers them (``@app.post(...)``, Starlette's
default router: case-sensitive, a trailing slash redirected) and the bodies are pydantic models
close to vLLM's: unknown fields pass (``extra="allow"``), a chat message has any role and its
content is a string or a list of parts (``text``, ``input_text``, ``output_text``, ``refusal``,
``thinking``, or a plain string), as vLLM's ``chat_utils`` reads them. uvicorn runs with its
``h11`` protocol, which decodes percent-escapes in the path before routing.

"What the model reads" is every text the server would hand to the model, per message joined the
way a chat template renders its parts (no separator), plus tool calls, reasoning, tool
definitions, chat ``documents`` (vLLM passes them to the template) and, per API, the system
prompt, document blocks, search results, instructions, prompt variables and the Completions
``suffix``. Each request is recorded (``GET /_records?case=ID``) and answered with a
small SSE stream in its API's format, or JSON when ``stream`` is false; the answer text comes from
the ``x-judge-answer`` header.

Run: ``python -m tests.judges.fastapi_judge [--host H] [--port P]``; it prints
``judge listening on HOST:PORT`` once the socket listens.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

CASE_HEADER = "x-judge-case"
ANSWER_HEADER = "x-judge-answer"
DEFAULT_ANSWER = "All good here."

RECORDS: list[dict[str, Any]] = []

app = FastAPI(title="judge", openapi_url=None, docs_url=None, redoc_url=None)


class Loose(BaseModel):
    """Unknown fields pass, as in vLLM's ``OpenAIBaseModel``."""

    model_config = ConfigDict(extra="allow")


# -- OpenAI Chat Completions ------------------------------------------------------------------


class ChatPart(Loose):
    type: str | None = None
    text: str | None = None
    thinking: str | None = None
    refusal: str | None = None


class FunctionCall(Loose):
    name: str | None = None
    arguments: str | None = None


class ToolCall(Loose):
    function: FunctionCall | None = None


class ChatMessage(Loose):
    role: str  # vLLM's CustomChatCompletionMessageParam: any role
    content: str | list[str | ChatPart] | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(Loose):
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(Loose):
    function: FunctionDefinition | None = None


class ChatCompletionRequest(Loose):
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    tools: list[ChatTool] | None = None
    documents: list[dict[str, str]] | None = None  # vLLM: handed to the chat template


def chat_part_text(part: str | ChatPart) -> str:
    if isinstance(part, str):
        return part
    if part.type in (None, "text", "input_text", "output_text"):
        return part.text or ""
    if part.type == "thinking":
        return part.thinking or ""
    if part.type == "refusal":
        return part.refusal or ""
    return ""  # images, audio, files: not text


def function_texts(name: str | None, description: str | None, schema: Any) -> list[str]:
    texts = [text for text in (name, description) if text]
    if schema:
        texts.append(json.dumps(schema))
    return texts


def chat_texts(request: ChatCompletionRequest) -> list[str]:
    texts: list[str] = []
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            texts.append("".join(chat_part_text(part) for part in content))
        for call in message.tool_calls or ():
            if call.function is not None:
                texts += [t for t in (call.function.name, call.function.arguments) if t]
        texts += [t for t in (message.reasoning, message.reasoning_content) if t]
    for tool in request.tools or ():
        if tool.function is not None:
            texts += function_texts(tool.function.name, tool.function.description,
                                    tool.function.parameters)
    texts += ["".join(document.values()) for document in request.documents or ()]
    return texts


# -- Anthropic Messages -----------------------------------------------------------------------


class Block(Loose):
    type: str
    text: str | None = None
    thinking: str | None = None
    input: Any = None
    content: str | list[Block] | None = None  # tool_result, search_result
    source: DocumentSource | str | None = None  # search_result: a URL
    title: str | None = None
    context: str | None = None


class DocumentSource(Loose):
    type: str  # text (data), content (content), base64 / url (a PDF: not text here)
    data: str | None = None
    content: str | list[Block] | None = None


class AnthropicMessage(Loose):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(Loose):
    name: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class MessagesRequest(Loose):
    model: str
    max_tokens: int
    messages: list[AnthropicMessage]
    system: str | list[Block] | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None


def block_text(block: Block) -> str:
    """A content block as the model reads it (a document's title and context come first)."""
    if block.type == "text":
        return block.text or ""
    if block.type == "thinking":
        return block.thinking or ""
    if block.type == "tool_use":
        return json.dumps(block.input)
    if block.type in ("tool_result", "search_result", "document"):
        parts = [block.title or "", block.context or ""]
        source = block.source
        if isinstance(source, str):
            parts.append(source)
        elif source is not None and source.type == "text":
            parts.append(source.data or "")
        elif source is not None and source.type == "content":
            parts.append(blocks_text(source.content))
        parts.append(blocks_text(block.content))
        return "".join(parts)
    return ""  # images, redacted thinking: not text


def blocks_text(content: str | list[Block] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join(block_text(block) for block in content or ())


def messages_texts(request: MessagesRequest) -> list[str]:
    texts = [blocks_text(request.system)] if request.system is not None else []
    texts += [blocks_text(message.content) for message in request.messages]
    for tool in request.tools or ():
        texts += function_texts(tool.name, tool.description, tool.input_schema)
    return texts


# -- OpenAI Responses -------------------------------------------------------------------------


class InputPart(Loose):
    type: str | None = None
    text: str | None = None
    refusal: str | None = None


class InputItem(Loose):
    type: str | None = None  # absent: an "easy" message
    role: str | None = None
    content: str | list[InputPart] | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    summary: list[InputPart] | None = None


class PromptReference(Loose):
    id: str
    variables: dict[str, str | InputPart] | None = None


class ResponsesTool(Loose):
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ResponsesRequest(Loose):
    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    prompt: PromptReference | None = None
    stream: bool = False
    tools: list[ResponsesTool] | None = None


def parts_text(content: str | list[InputPart] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join((part.text or part.refusal or "") for part in content or ())


def responses_texts(request: ResponsesRequest) -> list[str]:
    texts = [request.instructions] if request.instructions else []
    if request.prompt is not None:
        for value in (request.prompt.variables or {}).values():
            texts.append(value if isinstance(value, str) else parts_text([value]))
    items = request.input
    if isinstance(items, str):
        texts.append(items)
    for item in items if isinstance(items, list) else ():
        if item.type in (None, "message"):
            texts.append(parts_text(item.content))
        elif item.type in ("function_call", "custom_tool_call"):
            texts += [t for t in (item.name, item.arguments) if t]
        elif item.type in ("function_call_output", "custom_tool_call_output"):
            texts.append(parts_text(item.output))
        elif item.type == "reasoning":
            texts.append(parts_text(item.summary) + parts_text(item.content))
    for tool in request.tools or ():
        texts += function_texts(tool.name, tool.description, tool.parameters)
    return texts


# -- OpenAI legacy Completions ----------------------------------------------------------------


class CompletionRequest(Loose):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    stream: bool = False


def completions_texts(request: CompletionRequest) -> list[str]:
    prompt = request.prompt
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    return texts + ([request.suffix] if request.suffix else [])


# -- answers ----------------------------------------------------------------------------------


def pieces(answer: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", answer) or [""]


def sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{head}data: {data}\n\n".encode()


def chat_answer(answer: str, stream: bool) -> Iterable[bytes] | dict[str, Any]:
    head = {"id": "chatcmpl-judge", "created": 0, "model": "judge"}
    if not stream:
        return {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer},
             "finish_reason": "stop"}]}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    return [chunk({"role": "assistant", "content": ""}),
            *(chunk({"content": piece}) for piece in pieces(answer)),
            chunk({}, "stop"), sse("[DONE]")]


def completions_answer(answer: str, stream: bool) -> Iterable[bytes] | dict[str, Any]:
    head = {"id": "cmpl-judge", "object": "text_completion", "created": 0, "model": "judge"}
    if not stream:
        return {**head, "choices": [{"index": 0, "text": answer, "logprobs": None,
                                     "finish_reason": "stop"}]}

    def chunk(text: str, finish: str | None = None) -> bytes:
        return sse({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": finish}]})

    return [*(chunk(piece) for piece in pieces(answer)), chunk("", "stop"), sse("[DONE]")]


def messages_answer(answer: str, stream: bool) -> Iterable[bytes] | dict[str, Any]:
    message = {"id": "msg_judge", "type": "message", "role": "assistant", "model": "judge",
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 1, "output_tokens": 0}}
    if not stream:
        return {**message, "content": [{"type": "text", "text": answer}],
                "stop_reason": "end_turn"}
    events = [sse({"type": "message_start", "message": message}, "message_start"),
              sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    events += [sse({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
               for piece in pieces(answer)]
    return events + [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": len(pieces(answer))}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop")]


def responses_answer(answer: str, stream: bool) -> Iterable[bytes] | dict[str, Any]:
    part = {"type": "output_text", "text": answer, "annotations": []}
    item = {"id": "msg_judge", "type": "message", "role": "assistant", "status": "completed",
            "content": [part]}
    response = {"id": "resp_judge", "object": "response", "created_at": 0, "model": "judge",
                "status": "completed", "output": [item], "error": None,
                "incomplete_details": None}
    if not stream:
        return response
    numbers = iter(range(1_000_000))

    def event(kind: str, **payload: Any) -> bytes:
        return sse({"type": kind, **payload, "sequence_number": next(numbers)}, kind)

    where = {"item_id": "msg_judge", "output_index": 0, "content_index": 0}
    events = [
        event("response.created", response={**response, "status": "in_progress", "output": []}),
        event("response.output_item.added", output_index=0,
              item={**item, "status": "in_progress", "content": []}),
        event("response.content_part.added", **where, part={**part, "text": ""}),
    ]
    events += [event("response.output_text.delta", **where, delta=piece)
               for piece in pieces(answer)]
    return events + [
        event("response.output_text.done", **where, text=answer),
        event("response.content_part.done", **where, part=part),
        event("response.output_item.done", output_index=0, item=item),
        event("response.completed", response=response)]


# -- routes -----------------------------------------------------------------------------------


API_OF_ROUTE = {"/v1/chat/completions": "chat", "/v1/messages": "messages",
                "/v1/responses": "responses", "/v1/completions": "completions"}


def record(request: Request, api: str, outcome: str, texts: list[str],
           detail: str = "") -> None:
    RECORDS.append({
        "case": request.headers.get(CASE_HEADER, ""), "api": api, "outcome": outcome,
        "method": request.method, "path": request.scope["path"],
        "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
        "texts": texts, "detail": detail[:500],
    })


def answer(request: Request, stream: bool, build: Any) -> Response:
    built = build(request.headers.get(ANSWER_HEADER, DEFAULT_ANSWER), stream)
    if not stream:
        return JSONResponse(built)

    async def body() -> AsyncIterator[bytes]:
        for event in built:
            yield event

    return StreamingResponse(body(), media_type="text/event-stream")


@app.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    record(request, "chat", "read", chat_texts(body))
    return answer(request, body.stream, chat_answer)


@app.post("/v1/messages")
async def messages(request: Request, body: MessagesRequest) -> Response:
    record(request, "messages", "read", messages_texts(body))
    return answer(request, body.stream, messages_answer)


@app.post("/v1/responses")
async def responses(request: Request, body: ResponsesRequest) -> Response:
    record(request, "responses", "read", responses_texts(body))
    return answer(request, body.stream, responses_answer)


@app.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    record(request, "completions", "read", completions_texts(body))
    return answer(request, body.stream, completions_answer)


@app.get("/_records")
async def records(case: str = "") -> JSONResponse:
    return JSONResponse([r for r in RECORDS if not case or r["case"] == case])


@app.exception_handler(RequestValidationError)
async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    route = request.scope.get("route")
    api = API_OF_ROUTE.get(getattr(route, "path", ""), "")
    record(request, api, "invalid", [], repr(exc.errors()))
    return JSONResponse({"error": {"message": "invalid request", "type": "invalid_request"}},
                        status_code=422)


@app.exception_handler(StarletteHTTPException)
async def unrouted(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    record(request, "", "unrouted", [], f"{exc.status_code} {exc.detail}")
    return JSONResponse({"error": {"message": str(exc.detail), "type": "not_found"}},
                        status_code=exc.status_code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    print(f"judge listening on {host}:{port}", flush=True)
    config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off",
                            log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
