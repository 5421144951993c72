"""Dollar cost of guardrail calls (issue 18, item 3): text units per policy x a price table."""

from __future__ import annotations

import pytest

from extproc.domain.cost import DEFAULT_PRICES, cost_usd, unpriced


def test_the_default_prices_are_awss_public_ones() -> None:
    usage = {"contentPolicyUnits": 2, "topicPolicyUnits": 2, "wordPolicyUnits": 2,
             "sensitiveInformationPolicyUnits": 2, "sensitiveInformationPolicyFreeUnits": 2,
             "contextualGroundingPolicyUnits": 0}
    costs = cost_usd(usage, DEFAULT_PRICES)
    assert costs == pytest.approx({"contentPolicyUnits": 0.0003, "topicPolicyUnits": 0.0003,
                                   "sensitiveInformationPolicyUnits": 0.0002})
    assert sum(costs.values()) == pytest.approx(0.0008)


def test_a_price_table_overrides_and_unknown_policies_are_reported() -> None:
    usage = {"contentPolicyUnits": 1000, "newPolicyUnits": 3, "contentPolicyImageUnits": 4}
    costs = cost_usd(usage, {**DEFAULT_PRICES, "contentPolicyUnits": 0.07})
    assert costs == pytest.approx({"contentPolicyUnits": 0.07,
                                   "contentPolicyImageUnits": 0.003})
    assert unpriced(usage, DEFAULT_PRICES) == ["newPolicyUnits"]
