"""Joins the output directories of an array job (one per SLURM array task, data.part=k of data.parts)
into one set of files beside them, after checking that every row of the dataset is there once.

    root/task-0/, root/task-1/, ...  →  root/generations.parquet, timing.parquet, errors.parquet, manifest.json
"""

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from splitwiser.config import DataConfig
from splitwiser.errors import UserError
from splitwiser.data import read_dataset
from splitwiser.openai_batch import RESULTS
from splitwiser.output import (ERROR_SCHEMA, GENERATION_SCHEMA, TIMING_SCHEMA, atomic_write, read_generations,
                               write_json, write_parquet)
from splitwiser.score import METRICS, score_output

log = logging.getLogger(__name__)


def task_manifests(root: Path) -> list[dict]:
    """The manifests of root/task-*, checked to be the parts 0..parts-1 of one job, in part order."""
    task_dirs = sorted(root.glob("task-*"))
    if not task_dirs:
        raise UserError(f"{root}: no task-* directories to merge")
    manifests = {}
    for task_dir in task_dirs:
        if not (task_dir / "manifest.json").exists():
            raise UserError(f"{task_dir}: the task has not finished (no manifest.json); rerun it, then merge")
        manifest = json.loads((task_dir / "manifest.json").read_text())
        manifest["dir"] = str(task_dir)
        part, parts = manifest["fingerprint"]["part"]
        manifests[part] = manifest
    # The same job, split into the same number of parts: only the part index may differ.
    job = lambda m: {**m["fingerprint"], "part": m["fingerprint"]["part"][1]}  # noqa: E731
    if len({json.dumps(job(m), sort_keys=True) for m in manifests.values()}) > 1:
        raise UserError(f"{root}: the task directories hold different jobs (or different data.parts)")
    missing = sorted(set(range(parts)) - set(manifests))
    if missing:
        raise UserError(f"{root}: parts {missing} of {parts} have no task directory; run them, then merge")
    return [manifests[part] for part in range(parts)]


def _read_task(path: Path, schema: pa.Schema) -> pa.Table:
    """A task's file as `schema`; its generations.parquet with the columns beyond it (output.keep_columns'), less its
    scores (the merged rows are scored again)."""
    if schema is not GENERATION_SCHEMA:
        return pq.read_table(path, schema=schema)
    table = read_generations(path)
    return table.drop_columns([name for name in METRICS if name in table.column_names])


def _merge_results(root: Path, manifests: list[dict]) -> None:
    """output.format=openai_batch: root/results.jsonl, the tasks' in part order (their parts are contiguous, so
    this is the input's order)."""
    if manifests[0]["config"]["output"].get("format") != "openai_batch":
        return
    missing = next((m["dir"] for m in manifests if not (Path(m["dir"]) / RESULTS).is_file()), None)
    if missing:
        raise UserError(f"{missing}: no {RESULTS} (output.format=openai_batch); rerun the task, then merge")
    text = "".join((Path(m["dir"]) / RESULTS).read_text(encoding="utf-8") for m in manifests)
    atomic_write(root / RESULTS, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def merge_tasks(root: str, processes: int = 1) -> dict:
    """Writes the merged files into root and returns the merged manifest; raises UserError when a row
    of the dataset is missing or duplicated. processes: the CPU cores to score on."""
    root = Path(root).expanduser()
    manifests = task_manifests(root)
    tables = {}
    for schema, name in ((GENERATION_SCHEMA, "generations.parquet"), (TIMING_SCHEMA, "timing.parquet"),
                         (ERROR_SCHEMA, "errors.parquet")):
        tables[name] = pa.concat_tables([_read_task(Path(m["dir"]) / name, schema) for m in manifests],
                                        promote_options="default")
    generations, errors = tables["generations.parquet"], tables["errors.parquet"]

    dataset_rows = len(read_dataset(DataConfig(**{**manifests[0]["config"]["data"], "part": 0, "parts": 1})))
    duplicated = pc.count_distinct(generations["id"]).as_py() != generations.num_rows
    if duplicated or generations.num_rows + errors.num_rows != dataset_rows:
        raise UserError(f"{root}: the tasks hold {generations.num_rows} generations ({'with' if duplicated else 'no'} "
                        f"duplicate ids) and {errors.num_rows} errors, for a dataset of {dataset_rows} rows")
    _merge_results(root, manifests)  # first: a task without its results.jsonl refuses the merge before it writes
    for name, table in tables.items():
        write_parquet(table.sort_by("id"), root / name)
    manifest = {
        "fingerprint": {**manifests[0]["fingerprint"], "part": None},
        "config": {**manifests[0]["config"], "output": {**manifests[0]["config"]["output"], "dir": str(root)}},
        "rows": {"input": dataset_rows, "ok": generations.num_rows, "failed": errors.num_rows},
        "tasks": [{"dir": m["dir"], "part": m["fingerprint"]["part"], "rows": m["rows"], "runs": m["runs"],
                   "environment": m["environment"]} for m in manifests],
    }
    write_json(manifest, root / "manifest.json")
    if manifest["config"]["data"].get("reference_column"):
        manifest = score_output(root, processes)  # over the merged rows: the tasks' scores are not read (GENERATION_SCHEMA)
    log.info("merged %d tasks into %s: %d rows ok, %d failed, of %d", len(manifests), root,
             generations.num_rows, errors.num_rows, dataset_rows)
    return manifest
