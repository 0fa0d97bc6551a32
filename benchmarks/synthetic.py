"""Synthetic checkpoints with real shapes: ``python -m benchmarks.synthetic --shape llama-8b --layers 32 --out DIR``.

A seeded random-weight Hugging Face directory (``config.json``, bfloat16 safetensors shards of at most
``--max-shard-gb`` with ``model.safetensors.index.json``, a tokenizer) for measuring memory and time on models
larger than this machine's memory: quality is meaningless, shapes, dtypes and bytes are real. Weights are drawn
like a freshly initialised model's (normal, std = ``initializer_range`` 0.02; norms 1), which keeps activations
finite and non-degenerate through every layer.

The shards are written tensor by tensor in bounded memory (a tensor is generated a chunk of rows at a time and
streamed to the file after a header computed up front), so an 8B or 70B checkpoint can be written on a machine
with less memory than the model. Every tensor has its own seed (derived from ``--seed`` and its name): the bytes
do not depend on the order of writing or on the shard size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import log

SHAPES = {
    # Llama-3-8B: hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads, vocabulary 128256
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # Llama-3-70B: hidden 8192, MLP 28672, 80 layers, 64 query / 8 KV heads
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # a few-MB stand-in with the same structure, for tests
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=256),
}
INITIALIZER_RANGE = 0.02
ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # elements generated at once


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" | "ones"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of a Llama causal LM of ``config``, in state-dict order (untied head)."""
    d, i = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = d // heads
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], d), "normal")]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (d,), "ones"),
            TensorSpec(p + "self_attn.q_proj.weight", (heads * head_dim, d), "normal"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv * head_dim, d), "normal"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv * head_dim, d), "normal"),
            TensorSpec(p + "self_attn.o_proj.weight", (d, heads * head_dim), "normal"),
            TensorSpec(p + "post_attention_layernorm.weight", (d,), "ones"),
            TensorSpec(p + "mlp.gate_proj.weight", (i, d), "normal"),
            TensorSpec(p + "mlp.up_proj.weight", (i, d), "normal"),
            TensorSpec(p + "mlp.down_proj.weight", (d, i), "normal"),
        ]
    specs += [TensorSpec("model.norm.weight", (d,), "ones"),
              TensorSpec("lm_head.weight", (config["vocab_size"], d), "normal")]
    return specs


def plan_shards(specs: list[TensorSpec], max_bytes: int, itemsize: int = 2) -> list[list[TensorSpec]]:
    """Consecutive tensors packed into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _seed(base: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _chunks(spec: TensorSpec, seed: int):
    """The tensor's values in bfloat16, a block of rows at a time."""
    import torch

    if spec.kind == "ones":
        yield torch.ones(spec.shape, dtype=torch.bfloat16)
        return
    generator = torch.Generator().manual_seed(_seed(seed, spec.name))
    cols = spec.shape[1] if len(spec.shape) == 2 else 1
    rows = spec.shape[0]
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = torch.randn((n, cols) if len(spec.shape) == 2 else (n,), generator=generator, dtype=torch.float32)
        yield (block * INITIALIZER_RANGE).to(torch.bfloat16)


def write_shard(path: Path, specs: list[TensorSpec], seed: int) -> int:
    """A safetensors file written tensor by tensor (header first); returns its size in bytes."""
    import torch

    header, offset = {}, 0
    for spec in specs:
        nbytes = spec.numel * 2
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for spec in specs:
            for block in _chunks(spec, seed):
                handle.write(block.contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)
    return path.stat().st_size


def write_tokenizer(out: Path, vocab_size: int, text: str) -> None:
    """A byte-level BPE trained on ``text``, padded with reserved special tokens to ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size - 2, 16000), special_tokens=["<|begin_of_text|>",
                                                                                         "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_special_token_{k}|>" for k in range(missing)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    fast.save_pretrained(out)


def _training_text() -> str:
    from dotresize.data import load_text
    from dotresize.errors import DataNotFoundError

    try:
        return load_text("wikitext2").text[:2_000_000]
    except DataNotFoundError as error:  # no data directory: a deterministic stand-in text
        log(f"synthetic: the tokenizer is trained on a stand-in text ({str(error).splitlines()[0]})")
        words = [f"w{k}" for k in range(4000)]
        return "\n".join(" ".join(words[(j * 7 + k) % 4000] for k in range(40)) for j in range(5000))


def write_checkpoint(shape: str, out: Path, *, layers: int | None = None, seed: int = 0,
                     max_shard_gb: float = 5.0) -> dict:
    from transformers import LlamaConfig

    params = dict(SHAPES[shape])
    if layers is not None:
        params["num_hidden_layers"] = int(layers)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**params, initializer_range=INITIALIZER_RANGE, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    started = time.time()
    write_tokenizer(out, params["vocab_size"], _training_text())
    specs = tensor_specs(params)
    shards = plan_shards(specs, int(max_shard_gb * 2**30))
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        print(f"writing {name} ({len(shard)} tensors)", file=sys.stderr, flush=True)
        write_shard(out / name, shard, seed)
        for spec in shard:
            weight_map[spec.name] = name
            total += spec.numel * 2
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(out)
    result = {"shape": shape, "layers": params["num_hidden_layers"], "parameters": sum(s.numel for s in specs),
              "bytes": total, "shards": len(shards), "seconds": round(time.time() - started, 1), "out": str(out)}
    (out / "synthetic.json").write_text(json.dumps({**result, "seed": seed, "config": params}, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty: choose another --out")
    result = write_checkpoint(args.shape, out, layers=args.layers, seed=args.seed, max_shard_gb=args.max_shard_gb)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
