"""The exception hierarchy of the sidecar, in one place.

::

    ExtprocError
     ├── ConfigError                 bad settings, raised once at start-up (exit code 2)
     └── GuardrailError              an ApplyGuardrail call did not produce a verdict
          ├── GuardrailUnavailable   transient: the failure policy decides (fail closed/open)
          │    ├── GuardrailThrottled      429 ThrottlingException (RPS or text units/s)
          │    ├── GuardrailTimeout        no answer within the per-call deadline
          │    └── GuardrailServerError    5xx, connection errors, unparseable answers
          ├── GuardrailInputTooLarge  429 whose message says the text units exceed the maximum
          └── GuardrailRejected       4xx that retrying cannot fix: access denied, unknown
                                      guardrail or version, validation, quota exceeded

None of these is ever shown to an HTTP client: the client only ever sees the fixed error
objects built in ``extproc.formats``. ``error_class`` is the label used in logs and metadata.
"""

from __future__ import annotations


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


class GuardrailTimeout(GuardrailUnavailable):
    error_class = "timeout"


class GuardrailServerError(GuardrailUnavailable):
    error_class = "server_error"


class GuardrailInputTooLarge(GuardrailError):
    error_class = "input_too_large"


class GuardrailRejected(GuardrailError):
    error_class = "rejected"
