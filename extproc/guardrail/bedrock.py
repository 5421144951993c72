"""The Bedrock ApplyGuardrail client: the only module of the sidecar that imports boto3.

Owns the boto3 ``bedrock-runtime`` client (endpoint from ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``,
region and credentials from the standard AWS chain) and the lean client built from what it
resolves (``lean_client``, ``extproc.guardrail.lean``), the thread pool their blocking calls
run in (or the child process, ``extproc.guardrail.parent``), the per-attempt timeout, and
**the** mapping of AWS errors onto ``extproc.domain.errors`` (``map_boto_error``, also used by
the child process and the lean client). It returns typed verdicts
(``extproc.domain.verdict``) and never decides what a verdict means for a stream.

Retries, the per-call deadline, splitting of oversize input, the circuit breaker and the
client-side quota budget live in ``extproc.guardrail.resilient.ResilientGuardrail``, which
wraps this client; wrapped, it is built with ``max_attempts=1`` so that botocore does not retry
as well.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.utils

from extproc.domain.client import Content
from extproc.domain.errors import (
    ConfigError,
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailRejected,
    GuardrailServerError,
    GuardrailThrottled,
    GuardrailTimeout,
)
from extproc.domain.values import GuardrailRef, Source
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.guardrail.lean import (
    OPERATION,
    LeanApplyGuardrail,
    apply_body,
    apply_path,
    parse_answer,
)
from extproc.guardrail.parent import CallProcess
from extproc.settings.values import GuardrailCalls, GuardrailClientKind, Settings

if TYPE_CHECKING:  # boto3-stubs, a test dependency
    from mypy_boto3_bedrock_runtime.client import BedrockRuntimeClient
    from mypy_boto3_bedrock_runtime.type_defs import ApplyGuardrailResponseTypeDef

log = logging.getLogger(__name__)


_THROTTLE_CODES = frozenset({"ThrottlingException", "TooManyRequestsException"})
_SERVER_CODES = frozenset(
    {"InternalServerException", "ServiceUnavailableException", "InternalFailure",
     "ServiceUnavailable"}
)


def is_input_too_large_message(message: str) -> bool:
    """Whether an error message is Bedrock's "Input text size (N text units) exceeds the maximum
    allowed (M text units)", whatever the status code it came with."""
    lowered = message.lower()
    return "text units" in lowered and "exceeds the maximum" in lowered


def map_client_error(exc: botocore.exceptions.ClientError) -> GuardrailError:
    """Turn a botocore ``ClientError`` into our hierarchy (message kept for logs only)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    # Bedrock reports oversize input as a 429 ThrottlingException (bedrock.md A.4): splitting
    # helps, retrying never does.
    if is_input_too_large_message(message):
        return GuardrailInputTooLarge(f"{code}: {message}")
    if code in _THROTTLE_CODES or status == 429:
        return GuardrailThrottled(f"{code}: {message}")
    if code in _SERVER_CODES or status >= 500:
        return GuardrailServerError(f"{code}: {message}")
    return GuardrailRejected(f"{code} ({status}): {message}")


def map_boto_error(exc: Exception) -> GuardrailError | None:
    """The error of our hierarchy for an exception a boto3 call raised, or None when it is not
    botocore's (a bug of ours, for the caller to handle). The one mapping: the in-process
    client and the child process both use it."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return map_client_error(exc)
    if isinstance(exc, (botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectTimeoutError)):
        return GuardrailTimeout(type(exc).__name__)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return GuardrailServerError(f"{type(exc).__name__}: {exc}")
    return None


def content_blocks(content: Sequence[Content]) -> list[dict[str, Any]]:
    """The ``content`` member of a call: ``{"text": {"text": ...}}`` for a text,
    ``{"image": {"format": ..., "source": {"bytes": ...}}}`` for an ``ImageBlock`` (boto3
    base64-encodes the bytes)."""
    return [{"text": {"text": item}} if isinstance(item, str) else
            {"image": {"format": item.format, "source": {"bytes": item.data}}}
            for item in content]


def apply_request(guardrail_id: str, version: str, source: str,
                  texts: Sequence[Content]) -> dict[str, Any]:
    """The keyword arguments of one ``apply_guardrail`` call."""
    return {"guardrailIdentifier": guardrail_id, "guardrailVersion": version, "source": source,
            "content": content_blocks(texts)}


def aws_session(region: str | None) -> boto3.session.Session:
    """A boto3 session: region and credentials from the standard AWS chain (``ConfigError``
    when either is missing)."""
    session = boto3.session.Session(region_name=region)
    if session.region_name is None:
        raise ConfigError(
            "no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or a region in the AWS "
            "config profile)"
        )
    if session.get_credentials() is None:
        raise ConfigError(
            "no AWS credentials found in the standard chain (environment, shared "
            "credentials/config files, web identity/IRSA, container or instance role)"
        )
    return session


def _client_of(session: boto3.session.Session, *, threads: int, timeout_s: float,
               max_attempts: int) -> BedrockRuntimeClient:
    config = botocore.config.Config(
        connect_timeout=min(2.0, timeout_s),
        read_timeout=timeout_s,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=threads,
        user_agent_extra="guardrail-extproc",
    )
    return session.client("bedrock-runtime", config=config)


def boto3_client(region: str | None, *, threads: int, timeout_s: float,
                 max_attempts: int) -> BedrockRuntimeClient:
    """The boto3 ``bedrock-runtime`` client: region and credentials from the standard AWS chain
    (``ConfigError`` when either is missing), the endpoint from
    ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME`` when set; ``timeout_s`` is the read timeout."""
    return _client_of(aws_session(region), threads=threads, timeout_s=timeout_s,
                      max_attempts=max_attempts)


def lean_client(region: str | None, *, threads: int, timeout_s: float,
                max_attempts: int) -> LeanApplyGuardrail | None:
    """The lean client (``extproc.guardrail.lean``) with what botocore resolves for the boto3
    client: endpoint, region, signing name, the credential chain, TLS verification and the
    operation's model. None when a proxy applies to the endpoint (``HTTPS_PROXY``...) or a
    Bedrock API key (``AWS_BEARER_TOKEN_BEDROCK``) makes botocore use bearer auth: the caller
    then uses the boto3 client, which does both."""
    session = aws_session(region)
    client = _client_of(session, threads=threads, timeout_s=timeout_s,
                        max_attempts=max_attempts)
    endpoint_url = str(client.meta.endpoint_url)
    http_session: Any = getattr(client, "_endpoint", None)
    http_session = getattr(http_session, "http_session", None)
    proxies: Any = getattr(http_session, "_proxy_config", None)
    if proxies is not None and proxies.proxy_url_for(endpoint_url):
        log.info("a proxy applies to %s: ApplyGuardrail calls use the boto3 client",
                 endpoint_url)
        client.close()
        return None
    service_model = client.meta.service_model
    if botocore.utils.get_token_from_environment(service_model.signing_name) is not None:
        # botocore then authenticates with the bearer token (AWS_BEARER_TOKEN_BEDROCK)
        # instead of SigV4: leave it to boto3.
        log.info("a Bedrock API key (bearer token) is set: ApplyGuardrail calls use the boto3 "
                 "client")
        client.close()
        return None
    verify: Any = getattr(http_session, "_verify", True)
    credentials = session.get_credentials()
    assert credentials is not None, "BUG: aws_session checked the credentials"
    lean = LeanApplyGuardrail(
        endpoint_url=endpoint_url, region=str(client.meta.region_name),
        signing_name=str(service_model.signing_name),
        credentials=credentials,
        operation_model=service_model.operation_model(OPERATION),
        ssl_context=ssl_context(verify) if endpoint_url.startswith("https:") else None,
        timeout_s=timeout_s, connect_timeout_s=min(2.0, timeout_s),
        max_attempts=max_attempts)
    client.close()
    return lean


def ssl_context(verify: bool | str | None) -> ssl.SSLContext:
    """The TLS context of botocore's ``verify``: a CA bundle path, True (the system's), or
    False (no verification; never set by the sidecar itself)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


class BedrockGuardrailClient:
    """ApplyGuardrail calls off the event loop: in a child process (``--guardrail-calls
    process``) or a thread pool, through the lean client (``--guardrail-client lean``,
    ``extproc.guardrail.lean``) or boto3's (``boto3``).

    ``max_attempts`` (default ``settings.client.max_attempts``) is botocore's
    ``total_max_attempts`` (the lean client follows botocore's standard mode); give 1 when
    ``ResilientGuardrail`` wraps the client (it retries itself, inside its deadline).
    ``attempt_timeout_s`` (default ``settings.client.timeout_s``) bounds one call and is the
    read timeout; ``apply`` may lower it per call with ``timeout``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        max_attempts: int | None = None,
        attempt_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        attempts = settings.client.max_attempts if max_attempts is None else max_attempts
        if attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {attempts}")
        self._timeout = (
            settings.client.timeout_s if attempt_timeout_s is None else attempt_timeout_s
        )
        if not self._timeout > 0:
            raise ValueError(f"attempt_timeout_s must be positive, got {self._timeout}")
        self.max_attempts = attempts
        self._client: BedrockRuntimeClient | None = None
        self._lean: LeanApplyGuardrail | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._process: CallProcess | None = None
        kind = settings.client.client
        if settings.client.calls is GuardrailCalls.PROCESS:
            self._process = CallProcess(
                region=settings.client.aws_region, threads=settings.client.threads,
                timeout_s=self._timeout, max_attempts=attempts,
                log_level=settings.runtime.log_level,
                log_format=settings.runtime.log_format.value, clock=clock,
                client=kind.value)
            self._endpoint_url, self._region = self._process.endpoint_url, self._process.region
            self._kind = GuardrailClientKind(self._process.client)
        else:
            region, threads = settings.client.aws_region, settings.client.threads
            if kind is GuardrailClientKind.LEAN:
                self._lean = lean_client(region, threads=threads, timeout_s=self._timeout,
                                         max_attempts=attempts)
            if self._lean is not None:
                self._endpoint_url, self._region = self._lean.endpoint_url, self._lean.region
                self._kind = GuardrailClientKind.LEAN
            else:
                client = boto3_client(region, threads=threads, timeout_s=self._timeout,
                                      max_attempts=attempts)
                self._client = client
                self._endpoint_url = str(client.meta.endpoint_url)
                self._region = str(client.meta.region_name)
                self._kind = GuardrailClientKind.BOTO3
            self._executor = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="apply-guardrail"
            )

    @property
    def call_process_pid(self) -> int | None:
        """The child running the calls (``--guardrail-calls process``), if any."""
        return self._process.pid if self._process is not None else None

    @property
    def client_kind(self) -> GuardrailClientKind:
        """The client the calls go through (boto3 when the lean one cannot serve: a proxy)."""
        return self._kind

    @property
    def endpoint_url(self) -> str:
        return self._endpoint_url

    @property
    def region(self) -> str:
        return self._region

    def _call(self, guardrail: GuardrailRef, source: Source,
              texts: Sequence[Content]) -> ApplyGuardrailResponseTypeDef:
        assert self._client is not None, "BUG: an in-process call without the boto3 client"
        return self._client.apply_guardrail(
            **apply_request(guardrail.id, guardrail.version, source.value, texts))

    @property
    def timeout(self) -> float:
        """The per-call (per-attempt) timeout in seconds."""
        return self._timeout

    async def apply(
        self,
        guardrail: GuardrailRef,
        source: Source,
        texts: Sequence[Content],
        *,
        timeout: float | None = None,
    ) -> GuardrailVerdict:
        """One ApplyGuardrail call (retried up to ``max_attempts``), bounded by ``timeout`` if
        given and by the client's own timeout in any case."""
        limit = self._timeout if timeout is None else min(self._timeout, timeout)
        if limit <= 0:
            raise GuardrailTimeout("no time left for an ApplyGuardrail call")
        started = time.monotonic()
        future: Awaitable[Mapping[str, Any] | bytes]
        if self._kind is GuardrailClientKind.LEAN:
            path = apply_path(guardrail.id, guardrail.version)
            body = apply_body(source.value, texts)
            if self._process is not None:
                future = self._process.call_raw(path, body)
            else:
                assert self._lean is not None
                future = asyncio.get_running_loop().run_in_executor(
                    self._executor, self._lean.call, path, body)
        elif self._process is not None:
            future = self._process.call(guardrail.id, guardrail.version, source.value, texts)
        else:
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._call, guardrail, source, texts)
        try:
            # (asyncio.timeout, not wait_for: the call is awaited in this task, no task of its
            # own per call)
            async with asyncio.timeout(limit):
                answer = await future
        except TimeoutError:
            raise GuardrailTimeout(f"no ApplyGuardrail answer within {limit:.2f}s") from None
        except GuardrailError:
            raise
        except Exception as exc:
            error = map_boto_error(exc)
            if error is None:
                raise
            raise error from exc
        response = parse_answer(answer) if isinstance(answer, bytes) else answer
        if not isinstance(response, dict) or "action" not in response:
            raise GuardrailServerError("ApplyGuardrail answer without an action")
        verdict = classify(response)
        log.debug(
            "ApplyGuardrail source=%s blocks=%d outcome=%s text_units=%d latency_ms=%.1f",
            source.value, len(texts), verdict.outcome.value, verdict.text_units,
            (time.monotonic() - started) * 1000,
        )
        return verdict

    def close(self) -> None:
        if self._process is not None:
            self._process.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
        if self._lean is not None:
            self._lean.close()
