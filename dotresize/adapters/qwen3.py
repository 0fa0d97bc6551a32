"""The Qwen3 family: per-head RMSNorms on q and k, a head_dim decoupled from hidden_size / heads.

q_norm / k_norm act on the outputs of q_proj / k_proj, one head_dim-wide vector at a time: a basis of the
residual stream changes only the projections' input side, so they are untouched (exact in every layout). The
global layout's stock config scales ``rms_norm_eps`` by D/d for every norm, these too: their input linears are
scaled by √(D/d) to compensate (``head_norm_inputs``).
"""

from transformers import Qwen3ForCausalLM

from .base import FamilyLayout, ModelAdapter


class Qwen3Adapter(ModelAdapter):
    family = "qwen3"
    model_classes = (Qwen3ForCausalLM,)
    layout = FamilyLayout(head_norm_inputs=("self_attn.q_proj", "self_attn.k_proj"),
                          head_norms=("self_attn.q_norm", "self_attn.k_norm"))
    # head_dim 24: 4 heads x 24 = 96 != hidden 64, as in the real checkpoints (decoupled widths)
    tiny_settings = dict(head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
