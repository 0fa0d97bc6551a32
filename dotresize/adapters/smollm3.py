"""SmolLM3: Llama's layout (RMSNorm, q/k/v/o, gate/up/down, tied head); some layers use no rotary embedding (NoPE),
which their attention module decides, so a basis of the residual stream never sees it."""

from transformers import SmolLM3ForCausalLM

from .base import ModelAdapter


class SmolLM3Adapter(ModelAdapter):
    family = "smollm3"
    model_classes = (SmolLM3ForCausalLM,)
    # every second layer without RoPE (the real models: every fourth); no special ids outside the tiny vocabulary
    tiny_settings = dict(rms_norm_eps=1e-6, no_rope_layer_interval=2, tie_word_embeddings=True, pad_token_id=None,
                         bos_token_id=None, eos_token_id=None)
