"""Loading models: the GGUF conversion cache."""

import os
import shutil
from pathlib import Path

from splitwiser.config import ModelConfig
from splitwiser.models import convert_gguf, locate


def test_the_same_gguf_elsewhere_reuses_its_conversion(tmp_path, default_model):
    # Another virtual environment (or a reinstall) holds the same file at another path, with another mtime:
    # it must not cost another conversion (~20 s) and another ~500 MB in the cache.
    original = Path(locate(ModelConfig().path))
    copy = tmp_path / "other-venv" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    cache_dir = Path(os.path.expanduser(ModelConfig().cache_dir))
    assert convert_gguf(copy, cache_dir) == Path(default_model.source)
