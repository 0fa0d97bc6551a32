"""Evaluation precision: the model in float32 (default) or a reduced dtype, log-softmax always in float32.

A reduced dtype is what lm-eval's ``dtype="auto"`` gives a checkpoint stored in bfloat16 (SmolLM2's is), and it
is about twice as fast on CPUs with AVX512-BF16. Perplexity and lm-eval's log-likelihoods upcast the logits to
float32 before the log-softmax. ``float32_head=True`` also computes the output projection in float32 from a float32
copy of its weight taken before the cast (tied input embeddings are cast with the body): the logits are then not
rounded to 8 bits of mantissa, at about 40 % more time on CPU for a small model with a large vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EVAL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_EVAL_DTYPE = "float32"


def eval_dtype(name: str) -> torch.dtype:
    """The torch dtype of an evaluation precision name; ValueError naming the choices otherwise."""
    try:
        return EVAL_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown evaluation dtype {name!r}: use one of {', '.join(EVAL_DTYPES)}") from None


def precision_label(name: str, float32_head: bool = False) -> str:
    """How a precision is recorded beside results: ``float32``, ``bfloat16``, ``bfloat16 (output head float32)``."""
    eval_dtype(name)
    return f"{name} (output head float32)" if float32_head and name != DEFAULT_EVAL_DTYPE else name


def precision_slug(label: str) -> str:
    """A :func:`precision_label` as a short name for keys and metric prefixes: ``""`` for float32, else e.g.
    ``bfloat16`` or ``bfloat16-head32``."""
    if label == DEFAULT_EVAL_DTYPE:
        return ""
    name, _, head = label.partition(" ")
    return name + ("-head32" if head else "")


def set_evaluation_precision(model: torch.nn.Module, dtype: str = DEFAULT_EVAL_DTYPE,
                             float32_head: bool = False) -> str:
    """Cast ``model`` in place for evaluation and return its :func:`precision_label`.

    ``float32`` casts everything to float32. A reduced dtype casts the model to it, irreversibly (the float32
    weights are not kept: evaluate a model loaded for the purpose); with ``float32_head`` the output head computes
    float32 logits from a float32 copy of its weight. Raises ValueError for an unknown name, or for
    ``float32_head`` on a model without a Linear output head (``get_output_embeddings``).
    """
    name, dtype = dtype, eval_dtype(dtype)
    if dtype == torch.float32:
        model.to(torch.float32)
        return precision_label(name)
    if not float32_head:
        model.to(dtype)
        return precision_label(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"a float32 output head needs a model whose head is a Linear layer "
                         f"(get_output_embeddings); evaluate {type(model).__name__} without it")
    weight = head.weight.detach().to(torch.float32).clone()
    bias = None if head.bias is None else head.bias.detach().to(torch.float32).clone()
    model.to(dtype)

    def float32_logits(hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(torch.float32), weight.to(hidden.device),
                        None if bias is None else bias.to(hidden.device))

    head.forward = float32_logits
    return precision_label(name, float32_head=True)


__all__ = ["EVAL_DTYPES", "DEFAULT_EVAL_DTYPE", "eval_dtype", "precision_label", "precision_slug",
           "set_evaluation_precision"]
