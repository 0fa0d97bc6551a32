"""The Qwen2 / Qwen2.5 family: q/k/v biases, untied head (tied in the smallest sizes)."""

from transformers import Qwen2Config, Qwen2ForCausalLM

from .base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    family = "qwen2"
    model_classes = (Qwen2ForCausalLM,)
    model_types = ("qwen2",)

    @classmethod
    def tiny_config(cls, **overrides) -> Qwen2Config:
        base = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, use_sliding_window=False)
        return Qwen2Config(**{**base, **overrides})
