"""Test doubles and process stacks for the tests, the benchmarks and the demo.

* ``testkit.upstream``: the fake LLM upstream (``FakeLLM``: scripted SSE with real chunk
  boundaries, the canned default model, a record per request; ``python -m testkit.upstream``);
* ``testkit.stack``: real Envoy and sidecar processes with readiness and captured logs;
* ``testkit.monitored``: the sidecar's entry point with a task/RSS monitor beside it
  (``python -m testkit.monitored ARGS``), for soak runs and hostile-input tests.

The sidecar never imports this package (``tests/unit/test_runtime_imports.py`` checks it): it
ships in the wheel only so that ``guardrail-extproc-demo`` and the docker-compose demo have their
fake upstream.
"""
