"""The Llama family: Llama 2/3, SmolLM (GQA, tied or untied embeddings) and Mistral."""

from transformers import LlamaForCausalLM, MistralForCausalLM

from .base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_classes = (LlamaForCausalLM,)
    tiny_settings = dict(rms_norm_eps=1e-5, tie_word_embeddings=True)


class MistralAdapter(ModelAdapter):
    family = "mistral"
    model_classes = (MistralForCausalLM,)
    tiny_settings = dict(rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None)
