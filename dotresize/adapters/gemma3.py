"""Gemma 3, text (``Gemma3ForCausalLM``: gemma-3-1b and the text towers' own checkpoints): embeddings scaled by √D,
RMSNorm weights stored as w for a scale of 1 + w, four norms per layer, per-head q/k norms, sliding-window layers,
a tied head.

The norms before attention (``input_layernorm``) and before the MLP (``pre_feedforward_layernorm``) fold into the
linears after them, as Llama's. The post-attention and post-feed-forward norms sit on a block's *output*, before it
joins the residual stream: they normalise the full-width block output over D, so that output stays full width
(``o_proj`` and ``down_proj`` keep D outputs) through a weight-free norm over D, and the norm's 1 + w and the point's
basis act after it, as one D → d projection (``dotresize.modeling.BranchNorm``; docs/families.md derives it). The
global layout has no stock form: a stock Gemma 3 of width d normalises d coordinates of the block output, not its D.
"""

from transformers import Gemma3ForCausalLM

from .base import FamilyLayout, ModelAdapter


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_classes = (Gemma3ForCausalLM,)
    layout = FamilyLayout(
        embedding_scale="sqrt_hidden_size", norm_offset=1.0, input_norm="input_layernorm",
        post_attention_norm="pre_feedforward_layernorm", attention_output_norm="post_attention_layernorm",
        mlp_output_norm="post_feedforward_layernorm", head_norm_inputs=("self_attn.q_proj", "self_attn.k_proj"),
        head_norms=("self_attn.q_norm", "self_attn.k_norm"))
    global_layout_refusal = ("its post-attention and post-feed-forward norms normalise the full-width block output "
                             "before the residual add, and a stock Gemma 3 of width d would normalise d coordinates "
                             "of it instead")
    # head_dim 24 (4 x 24 != 64, decoupled as in the real models); a sliding window shorter than the test windows
    tiny_settings = dict(head_dim=24, query_pre_attn_scalar=24, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"], rms_norm_eps=1e-6,
                         tie_word_embeddings=True)
