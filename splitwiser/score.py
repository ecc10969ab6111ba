"""Quality against the reference: each generation's ROUGE-1, ROUGE-2 and ROUGE-L F-measures against its row's
reference (data.reference_column), as columns of generations.parquet, and their means in manifest.json's `quality`.

The scores are Google's `rouge-score` package's own (the maintained implementation that papers report), with its
Porter stemmer on (`use_stemmer=True`, its standard setting), so that they can be compared with published ones. A row
without a reference (none, or blank) has null scores and is left out of the means.

    from splitwiser.score import score_output
    manifest = score_output(Path("outputs/smollm2_135m-radiology"))  # rewrites both files atomically
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from splitwiser.errors import UserError
from splitwiser.output import exclusive, write_json, write_parquet
from splitwiser.rouge import METRICS, rouge_f1

SCORE_SCHEMA = pa.schema([(metric, pa.float64()) for metric in METRICS])  # the columns added to generations.parquet
METRIC = "rouge-score F1, stemmed"  # what manifest.json's quality says it holds


def quality(table: pa.Table) -> dict:
    """The means of a scored table's columns over the rows with a reference, and how many rows those are."""
    rows = table.num_rows - table[METRICS[0]].null_count
    return {"metric": METRIC, "rows": rows, **{metric: pc.mean(table[metric]).as_py() for metric in METRICS}}


def describe(quality: dict) -> str:
    """The means in one line, for the log: `rouge1 0.412, rouge2 0.203, rougeL 0.377 (rouge-score F1, stemmed) over
    300 rows with a reference`."""
    means = ", ".join(f"{metric} {'-' if quality[metric] is None else format(quality[metric], '.3f')}"
                      for metric in METRICS)
    return f"{means} ({quality['metric']}) over {quality['rows']} rows with a reference"


def score_output(directory: Path, processes: int = 1) -> dict:
    """Scores directory/generations.parquet (replacing scores already there: every row is scored again) and records
    the means in directory/manifest.json, each file rewritten atomically; returns the manifest. The other columns
    are kept as they are. processes: the CPU cores to score on."""
    table = pq.read_table(directory / "generations.parquet")
    table = table.drop_columns([metric for metric in METRICS if metric in table.column_names])
    scores = rouge_f1(table["generation"].to_pylist(), table["reference"].to_pylist(), processes)
    for field in SCORE_SCHEMA:
        table = table.append_column(field, pa.array(scores[field.name], field.type))
    write_parquet(table, directory / "generations.parquet")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["quality"] = quality(table)
    write_json(manifest, directory / "manifest.json")
    return manifest


def score_dir(directory: str, processes: int = 1) -> dict:
    """python -m jobs.score: scores a finished job's output directory (a job's, a merged array's, a nightly
    partition's) in place, holding its lock so that no job writes it meanwhile; returns its manifest."""
    path = Path(directory).expanduser()
    for name in ("generations.parquet", "manifest.json"):
        if not (path / name).is_file():
            raise UserError(f"output.dir={path}: no {name} there: give the output directory of a finished job")
    try:
        columns = pq.read_schema(path / "generations.parquet").names
        config = json.loads((path / "manifest.json").read_text()).get("config", {})
    except (OSError, ValueError, pa.ArrowException) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"output.dir={path}: cannot read its outputs: {reason}") from None
    if not config.get("data", {}).get("reference_column") or not {"generation", "reference"} <= set(columns):
        raise UserError(f"output.dir={path}: the job kept no reference (data.reference_column=null), "
                        "so there is nothing to score against")
    with exclusive(path, "output.dir"):
        return score_output(path, processes)
