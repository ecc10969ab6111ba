"""OPT (pre-layer-norm: every size but opt-350m)."""

from splitwiser.errors import UnsupportedModel
from splitwiser.families.base import Architecture, family


@family("opt")
class OPT(Architecture):
    def __init__(self, model):
        super().__init__(model)
        self.decoder = model.model.decoder
        self.layers = list(self.decoder.layers)
        if not model.config.do_layer_norm_before:
            raise UnsupportedModel("OPT with post-layer-norm (opt-350m)")
        self.scaling = 1.0  # OPT scales the queries before attention, as transformers does

    def embed(self, tokens, positions):
        x = self.decoder.embed_tokens(tokens)
        if self.decoder.project_in is not None:
            x = self.decoder.project_in(x)
        return x + self.decoder.embed_positions.weight[positions + self.decoder.embed_positions.offset]

    def attention_input(self, layer, x):
        return layer.self_attn_layer_norm(x)

    def qkv(self, layer, x, positions):
        attn = layer.self_attn
        q = self.split_heads(attn.q_proj(x) * attn.scaling, self.num_heads)
        return q, self.split_heads(attn.k_proj(x), self.num_heads), self.split_heads(attn.v_proj(x), self.num_heads)

    def attention_output(self, layer, x):
        return layer.self_attn.out_proj(x)

    def mlp(self, layer, x):
        return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))

    def final(self, x):
        x = self.decoder.final_layer_norm(x) if self.decoder.final_layer_norm is not None else x
        return self.decoder.project_out(x) if self.decoder.project_out is not None else x
