"""What a guardrail call costs in dollars: the text units ``ApplyGuardrail`` reports per policy
type (its ``usage``), times a price per 1,000 units.

The default prices are AWS's public on-demand prices for Bedrock Guardrails (us-east-1, as
published in 2026: content filters and denied topics $0.15 per 1,000 text units, sensitive
information filters $0.10, contextual grounding $0.10, Automated Reasoning $0.17; word
filters and custom regexes free; image content filters $0.00075 per image, ``usage``'s
``contentPolicyImageUnits`` counting images). Regions and agreements differ: the table is
overridable (``--price-table``), and AWS's bill is the authority. A ``usage`` member the table
does not name costs nothing and is reported once in the log by the caller.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

#: ``usage`` member -> USD per 1,000 units.
DEFAULT_PRICES: Final[Mapping[str, float]] = MappingProxyType({
    "contentPolicyUnits": 0.15,
    "topicPolicyUnits": 0.15,
    "sensitiveInformationPolicyUnits": 0.10,
    "sensitiveInformationPolicyFreeUnits": 0.0,
    "wordPolicyUnits": 0.0,
    "contextualGroundingPolicyUnits": 0.10,
    "automatedReasoningPolicyUnits": 0.17,
    "contentPolicyImageUnits": 0.75,  # $0.00075 per image
})


def policy_label(key: str) -> str:
    """A ``usage`` member as the policy label of metrics and ``--price-table``:
    ``sensitiveInformationPolicyFreeUnits`` -> ``sensitive_information_free``."""
    base = key[:-len("Units")] if key.endswith("Units") else key
    return "".join("_" + ch.lower() if ch.isupper() else ch
                   for ch in base.replace("Policy", "")).lstrip("_")


#: policy label -> ``usage`` member, for the members the default table names
LABELS: Final[Mapping[str, str]] = MappingProxyType(
    {policy_label(key): key for key in DEFAULT_PRICES})


def parse_price_table(value: str) -> Mapping[str, float]:
    """``content=0.15,sensitive_information=0.1``: the default table with those prices (USD per
    1,000 units) changed (``aws`` or nothing: the defaults); ``ValueError`` for an unknown
    label or a bad price."""
    prices = dict(DEFAULT_PRICES)
    if value.strip() == "aws":
        return DEFAULT_PRICES
    for item in filter(None, (part.strip() for part in value.split(","))):
        label, sep, price = item.partition("=")
        key = LABELS.get(label.strip())
        if not sep or key is None:
            raise ValueError(f"{item!r} is not <policy>=<USD per 1,000 units> with a policy "
                             f"among {', '.join(sorted(LABELS))}")
        try:
            number = float(price)
        except ValueError:
            raise ValueError(f"{price!r} is not a price") from None
        if not 0 <= number < 1000:
            raise ValueError(f"{number} is not a price between 0 and 1000")
        prices[key] = number
    return MappingProxyType(prices)


def format_price_table(prices: Mapping[str, float]) -> str:
    """``parse_price_table``'s spelling of a table (``--print-config``)."""
    return ",".join(f"{policy_label(key)}={price:g}" for key, price in prices.items())


def cost_usd(usage: Mapping[str, int], prices: Mapping[str, float]) -> dict[str, float]:
    """The cost of one call per ``usage`` member priced above zero (members ending in
    ``Units`` that the table names)."""
    costs: dict[str, float] = {}
    for key, units in usage.items():
        price = prices.get(key)
        if price and units > 0:
            costs[key] = units * price / 1000.0
    return costs


def unpriced(usage: Mapping[str, int], prices: Mapping[str, float]) -> list[str]:
    """The ``usage`` members with units that the table does not name (a new policy type)."""
    return [key for key, units in usage.items()
            if key.endswith("Units") and units > 0 and key not in prices]
