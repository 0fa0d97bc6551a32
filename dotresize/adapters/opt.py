"""OPT (125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b): LayerNorm with a bias, learned positions, a ReLU MLP (fc1, fc2) on the
layer itself, a final LayerNorm, a tied head.

Fusion is SliceGPT's (:mod:`dotresize.fusion`): every writer to the residual stream — token and position
embeddings, ``out_proj`` and ``fc2`` with their biases — has its output mean subtracted, so the stream is mean-free
and each LayerNorm is RMSN·w + b; w folds into the next linears' columns and b into their biases, the final norm's
b into a bias of the head (the per-point class's head has one). The global layout has no stock form: OPT's
attention is hidden_size wide inside (q/k/v/out_proj are hidden_size x hidden_size, head_dim = hidden_size / heads),
so a stock OPT of width d would narrow every head too.
"""

from transformers import OPTConfig, OPTForCausalLM

from ..errors import UnsupportedArchitectureError
from .base import FamilyLayout, ModelAdapter


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_classes = (OPTForCausalLM,)
    layout = FamilyLayout(
        layers="model.decoder.layers", embeddings="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", rotary=None, position_embeddings="model.decoder.embed_positions",
        position_offset=2, norm="layernorm", norm_eps=1e-5,  # nn.LayerNorm's default: OPT's config has no eps
        input_norm="self_attn_layer_norm", post_attention_norm="final_layer_norm",
        attention_output="self_attn.out_proj", mlp_inputs=("fc1",), mlp_output="fc2", mlp_activation="activation_fn",
        intermediate_size="ffn_dim")
    global_layout_refusal = ("OPT's attention is hidden_size wide inside (q/k/v/out_proj are hidden_size x "
                             "hidden_size), so a stock OPT of a smaller hidden_size would narrow every head too")

    @classmethod
    def check_config(cls, config: OPTConfig) -> None:
        problems = [why for bad, why in (
            (not config.do_layer_norm_before, "norms after the blocks (OPT-350m's post-LN)"),
            (config.word_embed_proj_dim != config.hidden_size, "project_in / project_out (word_embed_proj_dim != "
                                                               "hidden_size, OPT-350m)"),
            (not config.enable_bias, "linears without biases (a LayerNorm's bias needs one after it)"),
            (not config.layer_norm_elementwise_affine, "LayerNorms without weights"),
            (getattr(config, "_remove_final_layer_norm", False), "no final LayerNorm"),
        ) if bad]
        if problems:
            raise UnsupportedArchitectureError(f"this OPT variant is not supported ({'; '.join(problems)}): only "
                                               "pre-LN OPT with biases and hidden_size == word_embed_proj_dim is")

    @classmethod
    def tiny_config(cls, **overrides) -> OPTConfig:
        base = dict(vocab_size=96, hidden_size=64, ffn_dim=112, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64, tie_word_embeddings=True,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
        return OPTConfig(**{**base, **overrides})
