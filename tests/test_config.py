"""Configuration: validation messages and an exact JSON round trip."""

import pytest

from dotresize import CompressionConfig, DotOptions
from dotresize.errors import InvalidConfigError


def test_json_round_trip_is_exact():
    config = CompressionConfig(method="dot", ratio=0.3, widths=(8, 8, 16), keep_sets=((1, 2), (3,), (4,)),
                               dot=DotOptions(epsilon=0.02, cost="l1", decompression="plan"))
    again = CompressionConfig.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()


@pytest.mark.parametrize("changes, message", [
    ({"ratio": 1.0}, "ratio must be in"),
    ({"ratio": -0.1}, "ratio must be in"),
    ({"method": "svd"}, "method must be one of"),
    ({"layout": "global", "mode": "sequential"}, "needs mode 'parallel'"),
    ({"dot": DotOptions(epsilon=0.0)}, "epsilon must be a positive"),
    ({"version": 99}, "not supported"),
])
def test_invalid_values_are_rejected_with_a_hint(changes, message):
    with pytest.raises(InvalidConfigError, match=message):
        CompressionConfig(**changes).validate()


def test_unknown_keys_are_rejected():
    with pytest.raises(InvalidConfigError, match="unknown"):
        CompressionConfig.from_dict({"method": "dot", "sparsity": 0.2})
