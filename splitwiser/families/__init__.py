"""Model-family adapters: how each family of transformers models computes a layer, for runner.SlotRunner.

Supported: llama.py (Llama 1-3.x, SmolLM2, Qwen2/2.5, Mistral: sliding windows), qwen3.py, gemma.py (Gemma 2, Gemma 3
text), phi3.py (Phi-3/3.5, Phi-4-mini), opt.py; the README's "Model families" says what each needs.

To add a family:
1. a module here with a subclass of `base.Architecture` (its docstring lists what to set and implement),
   built from the model's own modules and registered with `@family("model_type", ...)`; it raises
   UnsupportedModel for variants it cannot run (every module here is imported, so that is all);
2. a test that the fast engine equals `generate(do_sample=False)` on it (the `architecture`
   parameter of tests/test_gpu.py's float32 test, with random weights).
A model type no module registers makes the job fall back to transformers' generate (mode=split, which hands
KV slots over, refuses it in one line).
"""

import importlib
import pkgutil

from splitwiser.families.base import FAMILIES, Architecture, adapter_for

for _module in pkgutil.iter_modules(__path__):  # each module registers its families
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "Architecture", "adapter_for"]
