"""The Llama family: Llama 2/3, SmolLM (GQA, tied or untied embeddings) and Mistral."""

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from .base import ModelAdapter

_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_classes = (LlamaForCausalLM,)
    model_types = ("llama",)

    @classmethod
    def tiny_config(cls, **overrides) -> LlamaConfig:
        return LlamaConfig(**{**_TINY, "tie_word_embeddings": True, **overrides})


class MistralAdapter(ModelAdapter):
    family = "mistral"
    model_classes = (MistralForCausalLM,)
    model_types = ("mistral",)

    @classmethod
    def tiny_config(cls, **overrides) -> MistralConfig:
        return MistralConfig(**{**_TINY, "tie_word_embeddings": False, "sliding_window": None, **overrides})
