"""The Phi-3 family (Phi-3, Phi-3.5, Phi-4-mini): fused ``qkv_proj`` and ``gate_up_proj``.

A fused linear reads the normalised residual stream like q/k/v and gate/up do, so it is one more input of the
norm: fusion scales its columns and a basis acts on its input side. On the MLP axis ``gate_up_proj`` stacks gate
then up rows (``mlp_input_blocks = 2``): a kept neuron keeps its row in both halves.
"""

from transformers import Phi3ForCausalLM

from .base import FamilyLayout, ModelAdapter


class Phi3Adapter(ModelAdapter):
    family = "phi3"
    model_classes = (Phi3ForCausalLM,)
    layout = FamilyLayout(attention_inputs=("self_attn.qkv_proj",), mlp_inputs=("mlp.gate_up_proj",),
                          mlp_input_blocks=2)
    # no pad/bos/eos ids: the defaults (32000, ...) lie outside the tiny vocabulary
    tiny_settings = dict(original_max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         sliding_window=None, pad_token_id=None, bos_token_id=None, eos_token_id=None)
