"""Phi-3/3.5-mini and Phi-4-mini (model type phi3): Llama-style with fused projections (qkv_proj: queries, keys and
values in one matrix; gate_up_proj, which the model's own MLP splits) and partial rotary (Phi-4-mini rotates only
the first partial_rotary_factor of each head). Its sliding_window, on every layer, is Llama.window's.

LongRoPE (rope_type longrope: Phi-3-128k, Phi-3.5-mini, Phi-4-mini) runs where every request fits
original_max_position_embeddings (4096 for those models): there transformers uses the short factors throughout.
Longer slots are refused, as the fast engine cannot give generate's tokens over them: transformers picks the short or the long factors per forward from the sequence's length
(its largest position + 1 > original_max_position_embeddings: dynamic_rope_update), so a prompt's keys depend on
its length, which a padded prefill group does not tell the adapter; and where a sequence first grows past that
length, generate drops its cache and recomputes the whole sequence with the long factors
(Phi3ForCausalLM.prepare_inputs_for_generation), which a decode step of one token per slot cannot redo."""

import inspect

from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from splitwiser.errors import UnsupportedModel
from splitwiser.families.base import family
from splitwiser.families.llama import Llama


@family("phi3")
class Phi3(Llama):
    def __init__(self, model):
        super().__init__(model)
        longrope = model.config.rope_parameters.get("rope_type") == "longrope"
        self.short_rope_until = model.config.original_max_position_embeddings if longrope else None
        self.apply_rotary = apply_rotary_pos_emb  # rotates the first rotary dims of each head, passes the rest
        self.sizes = [self.num_heads * self.head_dim] + 2 * [self.num_kv_heads * self.head_dim]

    def rotary(self, layer, x, positions):
        """RoPE's cos and sin. With LongRoPE (within original_max_position_embeddings: check_slot_length) the short
        factors, which the rotary embedding holds from its start, without its per-call check of the sequence's
        length: that check reads the positions on the host, which a CUDA-graph capture does not allow."""
        rotary = self.inner.rotary_emb
        if self.short_rope_until is None:
            return rotary(x, positions)
        return inspect.unwrap(type(rotary).forward)(rotary, x, positions)

    def check_slot_length(self, slot_length: int) -> None:
        if self.short_rope_until is not None and slot_length > self.short_rope_until:
            raise UnsupportedModel(f"Phi-3 LongRoPE past original_max_position_embeddings={self.short_rope_until} "
                                   f"(slots of {slot_length} positions): generate switches to the long factors "
                                   "and recomputes the cache where a sequence crosses it")

    def project(self, layer, x):
        q, k, v = layer.self_attn.qkv_proj(x).split(self.sizes, dim=-1)
        return (self.split_heads(q, self.num_heads), self.split_heads(k, self.num_kv_heads),
                self.split_heads(v, self.num_kv_heads))
