"""The domain: values, the guardrail client seam, verdicts, errors and the decision table.

Everything here is plain Python. It imports nothing else of the package (the one exception:
modules of this subpackage import each other) and never boto3, gRPC or protobuf, so the
per-stream state machine can be loaded and tested without any of them.
"""
