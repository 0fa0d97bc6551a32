"""Shared fixtures: tiny in-code models of every family, offline settings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Prefect keeps its database and settings under PREFECT_HOME: a scratch one per test session (removed when the
# session ends), never ~/.prefect; a PREFECT_HOME given from outside is used as it is
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dotresize-test-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dotresize.adapters import BY_FAMILY  # noqa: E402

#: every family's tiny config (the shared family tests run on each): one line per family
FAMILY_CONFIGS = {
    "llama-tied": lambda: BY_FAMILY["llama"].tiny_config(),
    "llama-untied": lambda: BY_FAMILY["llama"].tiny_config(tie_word_embeddings=False),
    "mistral": lambda: BY_FAMILY["mistral"].tiny_config(),
    "qwen2": lambda: BY_FAMILY["qwen2"].tiny_config(),
    "qwen3": lambda: BY_FAMILY["qwen3"].tiny_config(),
    "phi3": lambda: BY_FAMILY["phi3"].tiny_config(),
    "smollm3": lambda: BY_FAMILY["smollm3"].tiny_config(),
    "opt": lambda: BY_FAMILY["opt"].tiny_config(),
    "gemma3": lambda: BY_FAMILY["gemma3"].tiny_config(),
}


def adapter_of(model):
    """The adapter class of a source model or of its compressed form (a subclass of the source class)."""
    from dotresize.adapters import ADAPTERS

    return next(a for a in ADAPTERS if isinstance(model, a.model_classes))


def layers_of(model):
    """The decoder layers of a model of any family (source or compressed)."""
    return model.get_submodule(adapter_of(model).layout.layers)


def global_refusal(name: str) -> str | None:
    """Why family ``name`` has no stock form of the global layout (it is then refused), or None."""
    from dotresize.adapters import adapter_class_for_config

    return adapter_class_for_config(FAMILY_CONFIGS[name]()).global_layout_refusal


def make_tiny_model(name: str, seed: int = 0, **overrides):
    """A randomly initialised tiny model with non-trivial norm weights (so fusion is really tested); ``overrides``
    change its config (e.g. ``rms_norm_eps``)."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
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


def make_tiny_tokenizer(vocab_size: int = 96):
    """A word-level tokenizer over the words w1..w{vocab_size-1}, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]",
                                   pad_token="[UNK]")


def tiny_text(words: int = 6000, vocab_size: int = 96, seed: int = 0) -> str:
    """Text with some structure (a random Markov chain over the tiny vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(vocab_size - 1, vocab_size - 1, generator=generator), dim=1)
    state, out = 0, []
    for _ in range(words):
        state = int(torch.multinomial(transitions[state], 1, generator=generator))
        out.append(f"w{state + 1}")
    lines = [" ".join(out[i:i + 60]) for i in range(0, len(out), 60)]
    return "\n".join(lines) + "\n"


def write_model_dir(path, family: str = "llama-untied", seed: int = 0, mutate=None):
    """Save a tiny model (safetensors) and its tokenizer as a local HF directory."""
    model = make_tiny_model(family, seed)
    if mutate is not None:
        mutate(model)
    model.save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data directory laid out like ../shared/data with tiny WikiText-2 stand-ins."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "wiki.valid.tokens").write_text(tiny_text(seed=1))
    (root / "wikitext-2" / "wiki.test.raw").write_text(tiny_text(words=3000, seed=2).replace("\n", "\r\n"))
    return root


@pytest.fixture
def tiny_env(tiny_data_dir, monkeypatch, tmp_path):
    """Point every named data set at the tiny data directory; run in a scratch directory."""
    monkeypatch.setenv("DOTRESIZE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def real_data_dir():
    """The real local data directory with the zero-shot task files ($DOTRESIZE_DATA_DIR as the session found it,
    else ../shared/data), or None; session-scoped so it is resolved before any test points the setting elsewhere."""
    from dotresize.data import DataNotFoundError, resolve_data_dir

    try:
        data = resolve_data_dir()
    except DataNotFoundError:
        return None
    return data if data is not None and (data / "tasks" / "piqa_valid.jsonl").is_file() else None


@pytest.fixture(scope="session")
def prefect_api():
    """One local Prefect server for the whole session (started and stopped inside pytest); yields its API URL.

    Flows in this process use it; subprocesses get it through ``PREFECT_API_URL``.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
        _console_to_current_stderr()


def _console_to_current_stderr() -> None:
    """Prefect's console handler keeps the stream it was set up with; pytest's capture closes those."""
    import logging
    import sys

    for handler in logging.getLogger().handlers:
        console = getattr(handler, "console", None)
        if console is not None:
            console.file = sys.stderr


@pytest.fixture
def pipeline_env(tiny_env, prefect_api, monkeypatch):
    """tiny_env plus the session's Prefect server and a scratch MLflow home."""
    monkeypatch.setenv("DOTRESIZE_HOME", str(tiny_env / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tiny_env


def assert_fresh_process_logits(model_dir, ids: torch.Tensor, expected: torch.Tensor, cwd, *, checks: str = "",
                                trust_remote_code: bool = False) -> None:
    """Load ``model_dir`` with plain transformers in a new isolated Python (``-I``: no cwd or user site on its path;
    dotresize must not be imported) and check its logits on ``ids`` against ``expected`` (<= 1e-5). ``checks``: more
    lines of the script, run on the loaded model ``m``."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    cwd = Path(cwd)
    torch.save(ids.clone(), cwd / "ids.pt")  # test-only fixtures, read back with weights_only
    torch.save(expected, cwd / "expected.pt")
    remote = ", trust_remote_code=True" if trust_remote_code else ""
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32{remote}).eval()
assert "dotresize" not in sys.modules, "dotresize was imported"
{textwrap.dedent(checks).strip()}
ids = torch.load({str(cwd / 'ids.pt')!r}, weights_only=True)
exp = torch.load({str(cwd / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    diff = (m(input_ids=ids).logits - exp).abs().max().item()
assert diff <= 1e-5, diff
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def kill_when_paused(process, paused, timeout: float = 180) -> str:
    """SIGKILL ``process``'s whole session once ``paused()`` is true (the run wrote its pause marker, see
    ``DOTRESIZE_TEST_PAUSE_AT``); fails if it ends or times out first. Returns its stderr."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not paused():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before pausing:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("the run never reached its pause point")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return err
