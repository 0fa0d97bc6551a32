"""Shared fixtures: tiny in-code models of every family, offline settings."""

from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dotresize.adapters import ADAPTERS  # noqa: E402

FAMILY_CONFIGS = {
    "llama-tied": lambda: ADAPTERS[0].tiny_config(),
    "llama-untied": lambda: ADAPTERS[0].tiny_config(tie_word_embeddings=False),
    "mistral": lambda: ADAPTERS[1].tiny_config(),
    "qwen2": lambda: ADAPTERS[2].tiny_config(),
}


def make_tiny_model(name: str, seed: int = 0):
    """A randomly initialised tiny model with non-trivial norm weights (so fusion is really tested)."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[name]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            if name_.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def tiny_calibration(vocab: int = 96, samples: int = 16, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (samples, seqlen), generator=generator)


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request) -> str:
    return request.param
