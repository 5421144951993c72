# The guardrail sidecar: small, non-root. Also carries the demo's fake LLM (testkit, same wheel)
# and the local Bedrock endpoint (extproc.localbedrock), used by docker-compose.yml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY testkit ./testkit
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home extproc
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV PYTHONUNBUFFERED=1 \
    EXTPROC_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["guardrail-extproc"]
