"""The Qwen2 / Qwen2.5 family: q/k/v biases, untied head (tied in the smallest sizes)."""

from transformers import Qwen2ForCausalLM

from .base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    family = "qwen2"
    model_classes = (Qwen2ForCausalLM,)
    tiny_settings = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)
