"""SmolLM3: Llama's layout (RMSNorm, q/k/v/o, gate/up/down, tied head); some layers use no rotary embedding (NoPE),
which their attention module decides, so a basis of the residual stream never sees it."""

from transformers import SmolLM3Config, SmolLM3ForCausalLM

from .base import ModelAdapter


class SmolLM3Adapter(ModelAdapter):
    family = "smollm3"
    model_classes = (SmolLM3ForCausalLM,)
    model_types = ("smollm3",)

    @classmethod
    def tiny_config(cls, **overrides) -> SmolLM3Config:
        # every second layer without RoPE (the real models: every fourth); no special ids outside the tiny vocabulary
        base = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, no_rope_layer_interval=2,
                    tie_word_embeddings=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        return SmolLM3Config(**{**base, **overrides})
