"""Fixtures of the integration tier: the AWS environment isolated, and a local ApplyGuardrail
endpoint that boto3 (and the lean client) reach through the standard endpoint variable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.localbedrock import LocalBedrock, default_policy
from tests.support import isolate_aws_env


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_aws_env(monkeypatch)


@pytest.fixture
def bedrock(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBedrock]:
    with LocalBedrock(default_policy(), port=0) as lb:
        monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", lb.url)
        yield lb
