"""The exception hierarchy of the sidecar, in one place.

::

    ExtprocError
     ├── ConfigError                 bad settings, raised once at start-up (exit code 2)
     └── GuardrailError              an ApplyGuardrail call did not produce a verdict
          ├── GuardrailUnavailable   transient: the failure policy decides (fail closed/open)
          │    ├── GuardrailThrottled      "throttled": 429 ThrottlingException (RPS or text
          │    │    │                       units/s); retried with backoff
          │    │    └── GuardrailBudgetExhausted  "budget": our own client-side token bucket
          │    │                            (requests/s or text units/s) had no room within
          │    │                            the wait allowed; no request was sent, not retried
          │    ├── GuardrailTimeout        "timeout": no answer within the per-attempt timeout
          │    │                            or the per-call deadline; retried while time is left
          │    ├── GuardrailServerError    "server_error": 5xx, connection errors, unparseable
          │    │                            or inconsistent answers, unexpected client bugs;
          │    │                            retried
          │    └── GuardrailCircuitOpen    "circuit_open": the circuit breaker of this guardrail
          │                                 is open (recent calls kept failing); failed fast
          │                                 without a request, not retried
          ├── GuardrailInputTooLarge  "input_too_large": 429 whose message says the text units
          │                            exceed the maximum; never retried as is, the resilient
          │                            client splits the texts into smaller calls instead and
          │                            raises it only when one text unit is still too large
          ├── GuardrailRejected       "rejected": 4xx that retrying cannot fix: access denied,
          │                            unknown guardrail or version, validation, quota
          │                            exceeded; never retried, never trips the breaker,
          │                            logged loudly once per guardrail
          └── GuardrailOverload       "overload": a limit of this process was reached (bytes held
                                       by one stream, streams guarded at once); no request

``error_class`` is the label used in logs, metadata and the per-class failure policy
(``extproc.domain.failure.FailurePolicy``, applied by ``extproc.domain.decision``). Every error
that reaches the stream code carries one of ``ERROR_CLASSES``; ``GuardrailError`` and
``GuardrailUnavailable`` themselves are abstract ("error", "unavailable") and
``extproc.guardrail.resilient.ResilientGuardrail`` turns any such instance (or any unexpected
exception of an inner client) into a ``GuardrailServerError``.

None of these is ever shown to an HTTP client: the client only ever sees the fixed error
objects built in ``extproc.formats``.
"""

from __future__ import annotations

from typing import Final

#: Every ``error_class`` a raised guardrail error carries, in the order of the docstring.
ERROR_CLASSES: Final = (
    "throttled",
    "timeout",
    "server_error",
    "input_too_large",
    "rejected",
    "circuit_open",
    "budget",
    "overload",
)

#: The classes a retry can fix: transient failures of one request.
RETRYABLE_CLASSES: Final = frozenset({"throttled", "timeout", "server_error"})


class ExtprocError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ExtprocError):
    """A setting is missing or invalid; the message names the setting and says why."""


class GuardrailError(ExtprocError):
    """An ApplyGuardrail call failed; ``error_class`` names the failure for logs."""

    error_class = "error"


class GuardrailUnavailable(GuardrailError):
    error_class = "unavailable"


class GuardrailThrottled(GuardrailUnavailable):
    error_class = "throttled"


class GuardrailBudgetExhausted(GuardrailThrottled):
    """The client-side request or text-unit budget had no room in time; nothing was sent."""

    error_class = "budget"


class GuardrailTimeout(GuardrailUnavailable):
    error_class = "timeout"


class GuardrailServerError(GuardrailUnavailable):
    error_class = "server_error"


class GuardrailCircuitOpen(GuardrailUnavailable):
    """The guardrail's circuit breaker is open; the call failed fast without a request."""

    error_class = "circuit_open"


class GuardrailInputTooLarge(GuardrailError):
    error_class = "input_too_large"


class GuardrailRejected(GuardrailError):
    error_class = "rejected"


class GuardrailOverload(GuardrailError):
    """A limit of this process was reached (``--max-held-bytes``, ``--max-streams``)."""

    error_class = "overload"
