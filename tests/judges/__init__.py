"""Judge upstreams for the adversarial tier (``tests/adversarial``): real servers that parse a
request the way an LLM API server would and record what its model would read.

* ``fastapi_judge``: FastAPI on uvicorn, pydantic request models close to vLLM's (the stack under
  vLLM and LiteLLM);
* ``node/judge.js``: Node + Express with ``express.json()`` and the default router;
* ``process``: starting either as a process on 127.0.0.1 port 0 and reading its records.

Both speak the same small protocol: ``x-judge-case`` names the request in the records,
``x-judge-answer`` scripts the answer text, ``GET /_records?case=ID`` returns the records (each
``{"case", "api", "outcome", "method", "path", "raw_path", "texts", "detail"}``; ``outcome`` is
``read``, ``unrouted`` or ``invalid``; ``texts`` is what the model would read).
"""
