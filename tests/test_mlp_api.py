"""The MLP's intermediate width as a second axis (issue 16): config, in-memory API, export and command line.

The pure functions (keep rules, maps, exactness of ``lsq`` on linearly dependent neurons) are tested in
tests/test_mlp.py; here the axis is tested end to end on tiny in-code models.
"""

import json

import pytest

from dotresize import CompressionConfig
from dotresize.config import MlpDotOptions, MlpOptions
from dotresize.errors import InvalidConfigError


# --- config ---------------------------------------------------------------------------------------------------------
def test_config_with_the_mlp_axis_round_trips_exactly():
    configs = [
        CompressionConfig(method="pca", ratio=0.25, mlp_ratio=0.3,
                          mlp=MlpOptions(method="dot", keep_rule="energy", ridge=0.05,
                                         dot=MlpDotOptions(epsilon=0.1, cost="l2", prior=True))),
        CompressionConfig(ratio=0.0, layout="global", mlp_widths=(80, 96, 104)),
        CompressionConfig(mlp=MlpOptions(method="prune")),  # options without a ratio still round-trip
    ]
    for config in configs:
        config.validate()
        text = config.to_json()
        again = CompressionConfig.from_json(text)
        assert again == config and again.to_json() == text
        assert json.loads(text)["version"] == 2
    assert configs[0].mlp_method == "dot" and configs[1].mlp_active and not configs[2].mlp_active


def test_a_config_without_the_mlp_axis_keeps_its_version_1_form():
    """Recipe digests, stage keys and run keys hash ``to_dict()``: it must not change for existing configs."""
    config = CompressionConfig(method="pca", ratio=0.2, mlp_ratio=0.0)
    data = config.to_dict()
    assert data["version"] == 1 and not any(key.startswith("mlp") for key in data)
    assert CompressionConfig.from_dict(data) == config
    old = dict(data)  # what version 1 wrote, read as the current version
    assert CompressionConfig.from_dict(old).validate().mlp_ratio == 0.0


@pytest.mark.parametrize("changes, message", [
    ({"mlp_ratio": 1.0}, "mlp_ratio must be in"),
    ({"mlp_ratio": -0.1}, "mlp_ratio must be in"),
    ({"mlp_ratio": 0.2, "mlp_widths": (8, 8, 8)}, "not both"),
    ({"mlp_widths": (8, 0, 8)}, "one positive integer width per layer"),
    ({"mlp_widths": ()}, "one positive integer width per layer"),
    ({"mlp": MlpOptions(method="svd")}, "mlp method must be one of"),
    ({"mlp": MlpOptions(ridge=-1.0)}, "mlp ridge must be"),
    ({"mlp": MlpOptions(keep_rule="random")}, "mlp keep rule must be one of"),
    ({"mlp": MlpOptions(dot=MlpDotOptions(epsilon=0.0))}, "mlp dot epsilon"),
    ({"mlp_ratio": 0.2, "version": 1}, "no MLP axis"),
])
def test_bad_mlp_values_are_rejected_with_one_message(changes, message):
    with pytest.raises(InvalidConfigError, match=message) as caught:
        CompressionConfig(**changes).validate()
    assert "\n" not in str(caught.value)


def test_unknown_mlp_keys_and_versions_are_rejected():
    with pytest.raises(InvalidConfigError, match="unknown mlp option keys"):
        CompressionConfig.from_dict({"mlp": {"sparsity": 0.2}})
    with pytest.raises(InvalidConfigError, match="unknown mlp dot option keys"):
        CompressionConfig.from_dict({"mlp": {"dot": {"eps": 0.2}}})
    with pytest.raises(InvalidConfigError, match="not supported"):
        CompressionConfig.from_dict({"version": 3})
