"""The benchmark: python -m jobs.bench [preset=quick|full|workers|paper] (conf/bench.yaml, conf/preset/,
splitwiser/bench.py).

Writes <results_dir>/<date>-<device>-<preset>.parquet (one row per model x length x system, with the
command, commit, device and versions), the report and plots beside it: in outputs/bench/ unless
results_dir=bench/results report=bench/RESULTS.md are given.
"""

import logging
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from jobs import command
from splitwiser.bench import System, measure, measure_job, system_columns, with_headers, with_long_rows, workload, \
    write_long_rows, write_workload
from splitwiser.config import ModelConfig, PromptConfig
from splitwiser.errors import UserError
from splitwiser.job import environment
from splitwiser.models import load_model
from splitwiser.report import write_report

log = logging.getLogger("splitwiser.bench")
ROOT = Path(__file__).resolve().parents[1]


def model_config(cfg: DictConfig, model: str) -> DictConfig:
    """A model of the grid, with random weights: conf/model/NAME.yaml, or a real model's shape, bench/shapes/NAME
    (its config.json alone); NAME:fp8, the same with model.quantization=fp8."""
    name, _, quantization = model.partition(":")
    conf, shape = ROOT / "conf/model" / f"{name}.yaml", ROOT / "bench/shapes" / name
    if not conf.exists() and not (shape / "config.json").exists():
        shapes = sorted(p.parent.name for p in (ROOT / "bench/shapes").glob("*/config.json"))
        raise UserError(f"models: {name} is neither conf/model/{name}.yaml nor one of bench/shapes: {', '.join(shapes)}")
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                OmegaConf.load(conf) if conf.exists() else {"name": name, "path": str(shape)})
    model_cfg.path = cfg.model_paths.get(name, model_cfg.path)
    model_cfg.tokenizer = cfg.tokenizer or model_cfg.tokenizer
    model_cfg.weights, model_cfg.dtype, model_cfg.quantization = "random", cfg.dtype, quantization or None
    return model_cfg


@command("bench")
def main(cfg: DictConfig) -> None:
    preset = cfg.preset
    systems = [System(**s) for s in OmegaConf.to_container(preset.systems)]
    grid = [(m, n, s) for m in cfg.models or preset.models for n in preset.max_new_tokens for s in systems]
    command = " ".join(["python -m jobs.bench", *sys.argv[1:]])
    stamp = datetime.now(timezone.utc)
    scratch = ROOT / "outputs" / "bench" / f"{stamp:%Y%m%d-%H%M%S}-{preset.name}"
    results_dir, report = Path(cfg.results_dir or scratch), Path(cfg.report or scratch / "RESULTS.md")
    work = Path(tempfile.mkdtemp(prefix="splitwiser-bench-"))  # the workload file and the jobs' outputs
    data = write_workload(Path(cfg.data), preset.requests, work / "workload.csv")
    long_rows = max(s.long_rows for s in systems)
    long_data = write_long_rows(Path(cfg.data), long_rows, work / "long.csv") if long_rows else None
    rows, loaded_name, env = [], None, None
    for model_name, max_new_tokens, system in tqdm(grid, desc="benchmark", unit="run"):
        if loaded_name != model_name:
            model_cfg = model_config(cfg, model_name)
            loaded, loaded_name = load_model(OmegaConf.to_object(model_cfg)), model_name
            env = environment(loaded)
            style = "chat" if loaded.tokenizer.chat_template and model_name != "opt125m" else "plain"
            requests = workload(loaded, data, PromptConfig(style=style))
            long = workload(loaded, long_data, PromptConfig(style=style)) if long_data else []
            # The same model and requests for the systems that run as jobs.
            job_overrides = [f"model={model_cfg.name}", f"model.path={model_cfg.path}", "model.weights=random",
                             f"model.dtype={cfg.dtype}", f"prompt.style={style}",
                             *([f"model.quantization={model_cfg.quantization}"] if model_cfg.quantization else [])]
            if model_cfg.tokenizer:
                job_overrides.append(f"model.tokenizer={model_cfg.tokenizer}")
        measured = with_headers(with_long_rows(requests, long[:system.long_rows]), system)
        try:
            if system.mode:
                out = work / f"{model_name}-{max_new_tokens}-{system.name}-{system.mode}-p{system.procs}-mps{system.mps}"
                result = measure_job(system, job_overrides, data, max_new_tokens, out, loaded.device)
            else:
                result = measure(system, loaded, measured, max_new_tokens)
        except Exception as e:  # a baseline that fails here is a result too; say why
            log.warning("%s failed: %s", system, e)
            result = {**system_columns(system, max_new_tokens), "error": f"{type(e).__name__}: {e}"[:300]}
        result.update(model=model_name, preset=preset.name, date=stamp.date().isoformat(), command=command,
                      prompt_tokens_mean=round(sum(r.prompt_tokens for r in measured) / len(measured), 1), **env)
        log.info("%s", {k: result.get(k) for k in ("model", "system", "mode", "procs", "mps", "batch_size",
                                                  "max_new_tokens", "tokens_per_s", "warmup_s", "run_s", "error")})
        rows.append(result)
        # Written after every run, so that a grid cut short still leaves what it measured.
        results = results_dir / f"{stamp:%Y-%m-%d}-{env['device_name'].replace(' ', '-')}-{preset.name}.parquet"
        results.parent.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist reads the first row's only
        pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), results)
        write_report(rows, report, results)
    shutil.rmtree(work)
    log.info("wrote %s and %s", results, report)


if __name__ == "__main__":
    main()
