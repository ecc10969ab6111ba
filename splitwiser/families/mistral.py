"""Mistral (model type mistral): Llama-style with a sliding window of config.sliding_window on every layer (None:
full attention). MistralModel reads no layer_types, even where a config has them, so neither does this."""

from splitwiser.families.base import family
from splitwiser.families.llama import Llama


@family("mistral")
class Mistral(Llama):
    def window(self, index):
        return self.model.config.sliding_window
