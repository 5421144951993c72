"""The demo launcher (``python -m extproc.demo``, ``guardrail-extproc-demo``); its fake LLM and
process helpers live in ``testkit``."""
