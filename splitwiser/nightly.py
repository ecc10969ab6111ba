"""The nightly job: summarize only the rows that are new or changed since the last run.

    output.dir/ledger.parquet        one line per row ever done: id, key, partition
    output.dir/quality.parquet       one line per partition: its night, rows scored, ROUGE means (a drop shows)
    output.dir/2026-11-24/           one partition per night: input.parquet (its rows), then the job's
    output.dir/2026-11-25/ ...       usual files (generations.parquet, errors.parquet, manifest.json)

A row's key hashes its id, its text, the other columns its prompt names, and what would change its
summary (model, prompt, generation settings), so a changed report or a new model makes it new again. A row is new
when its key is not one of its id's latest partition (a report changed back to an earlier text runs again). A
partition enters the ledger only once its job has finished: a night that failed or was killed is resumed by the
next run, before that run looks for new rows. Running twice with nothing new does nothing the second time.

latest() writes the current summary of each id across the partitions: its row of the latest partition that
generated it (python -m jobs.latest dir=ROOT).
"""

import hashlib
import json
import logging
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from splitwiser.config import JobConfig
from splitwiser.errors import UserError
from splitwiser.data import prompt_columns, read_dataset
from splitwiser.job import fingerprint, run
from splitwiser.openai_batch import is_batch_file
from splitwiser.output import atomic_write, exclusive, write_parquet
from splitwiser.score import METRICS, SCORE_SCHEMA

log = logging.getLogger(__name__)
LEDGER_SCHEMA = pa.schema([("id", pa.string()), ("key", pa.string()), ("partition", pa.string())])
KEY_COLUMN = "_splitwiser_key"
# A partition's manifest's quality (splitwiser/score.py): its night, the rows with a reference, their means.
QUALITY_SCHEMA = pa.schema([("partition", pa.string()), ("night", pa.date32()), ("rows", pa.int64()), *SCORE_SCHEMA])


def row_keys(job: JobConfig, ids: list, texts: list, named: list[list] = ()) -> list[str]:
    """Each row's key; `named`: the values of the other columns the prompt names, a list per column (none: the
    keys of jobs whose prompt names only the text)."""
    settings = {k: v for k, v in fingerprint(job).items() if k not in ("data", "part")}
    salt = json.dumps(settings, sort_keys=True)
    return [hashlib.sha256(json.dumps([salt, str(i), *values]).encode()).hexdigest()
            for i, *values in zip(ids, texts, *named)]


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.table = pq.read_table(path, schema=LEDGER_SCHEMA) if path.exists() else LEDGER_SCHEMA.empty_table()

    def keys(self) -> set[str]:
        """The keys that are done: those of each id's latest partition (a row changed back to an earlier text is new
        again), and every key of a row without an id."""
        ids, keys, partitions = (self.table[name].to_pylist() for name in ("id", "key", "partition"))
        latest = dict(zip(ids, partitions))  # the last line of an id is of its latest partition
        return {key for i, key, partition in zip(ids, keys, partitions) if i is None or latest[i] == partition}

    def partitions(self) -> set[str]:
        return set(self.table["partition"].to_pylist())

    def add(self, ids: list, keys: list[str], partition: str) -> None:
        rows = pa.table({"id": [None if i is None else str(i) for i in ids], "key": keys,
                         "partition": [partition] * len(keys)}, schema=LEDGER_SCHEMA)
        self.table = pa.concat_tables([self.table, rows])
        write_parquet(self.table, self.path)


def run_partition(job: JobConfig, partition: Path, ledger: Ledger) -> dict:
    """Runs (or resumes) the job over partition/input.parquet, then records its rows in the ledger."""
    data = replace(job.data, path=str(partition / "input.parquet"), limit=None, part=0, parts=1)
    # A partition resumes; it is never overwritten (its input.parquet is not the job's own output).
    manifest = run(replace(job, data=data, output=replace(job.output, dir=str(partition), overwrite=False)))
    if "quality" in manifest:  # before the ledger: a partition killed in between is resumed, and its row replaced
        record_quality(partition.parent / "quality.parquet", partition.name, manifest["quality"])
    done = pq.read_table(partition / "input.parquet", columns=[job.data.id_column, KEY_COLUMN])
    ledger.add(done[job.data.id_column].to_pylist(), done[KEY_COLUMN].to_pylist(), partition.name)
    return manifest


def record_quality(path: Path, partition: str, quality: dict) -> None:
    """Sets the partition's line in the nightly root's quality.parquet (one per partition, in the order they
    finished), so that a night whose scores drop stands out."""
    table = pq.read_table(path, schema=QUALITY_SCHEMA) if path.exists() else QUALITY_SCHEMA.empty_table()
    row = {"partition": partition, "night": date.fromisoformat(partition[:10]), "rows": quality["rows"],
           **{metric: quality[metric] for metric in METRICS}}
    others = table.filter(pc.not_equal(table["partition"], partition))
    write_parquet(pa.concat_tables([others, pa.Table.from_pylist([row], schema=QUALITY_SCHEMA)]), path)


def partition_name(root: Path, night: date) -> str:
    """The night's date; a second run the same night with new rows gets 2026-11-24.2, and so on."""
    name, n = night.isoformat(), 1
    while (root / name).exists():
        n += 1
        name = f"{night.isoformat()}.{n}"
    return name


def nightly(job: JobConfig, night: date) -> list[dict]:
    """Resumes unfinished partitions, then runs tonight's new rows; returns the manifests of the runs."""
    if job.data.id_column is None:
        raise UserError("the nightly job needs data.id_column: rows are recognised by their id from night to night")
    if job.data.parts != 1:
        raise UserError("the nightly job runs the whole dataset; data.part/data.parts are for array jobs")
    if is_batch_file(job.data.path):
        raise UserError(f"data.path={job.data.path} is an OpenAI batch file: run it with jobs.run; the nightly job "
                        "reads a dataset")
    root = Path(job.output.dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root, "output.dir"):  # one nightly job at a time updates the ledger and names partitions
        return nightly_locked(job, night, root)


def nightly_locked(job: JobConfig, night: date, root: Path) -> list[dict]:
    """nightly(), with root held by this job."""
    ledger = Ledger(root / "ledger.parquet")
    manifests, finished = [], ledger.partitions()
    for partition in sorted(p.parent for p in root.glob("*/input.parquet")):
        if partition.name not in finished:
            log.info("resuming the unfinished partition %s", partition.name)
            manifests.append(run_partition(job, partition, ledger))

    rows = read_dataset(job.data, job.prompt, job.output.keep_columns)
    text = job.data.messages_column or job.data.text_column  # a conversation is the row's text
    named = [c for c in dict.fromkeys(prompt_columns(job.data, job.prompt).values()) if c != text]
    keys = row_keys(job, rows[job.data.id_column], rows[text], [rows[c] for c in named])
    seen = ledger.keys()
    new = [i for i, key in enumerate(keys) if key not in seen]
    log.info("%d rows: %d new or changed since the last run", len(rows), len(new))
    if not new:
        return manifests
    partition = root / partition_name(root, night)
    partition.mkdir()
    tonight = rows.select(new).add_column(KEY_COLUMN, [keys[i] for i in new])
    atomic_write(partition / "input.parquet", lambda tmp: tonight.to_parquet(str(tmp)))
    manifests.append(run_partition(job, partition, ledger))
    return manifests


GENERATIONS = "generations.parquet"
LATEST = "latest.parquet"  # python -m jobs.latest's default output, in the nightly root


def finished_partitions(root: Path) -> list[str]:
    """The partitions of a nightly root that have finished, in the order they ran (the ledger's)."""
    if not root.is_dir():
        raise UserError(f"dir={root}: no such directory")
    if not (root / "ledger.parquet").is_file():
        what = ("it holds one job's outputs: its generations.parquet is the latest" if (root / GENERATIONS).exists()
                else "it has no ledger.parquet, which jobs.nightly writes once its first night has finished")
        raise UserError(f"dir={root} is no nightly root: {what}")
    partitions = list(dict.fromkeys(Ledger(root / "ledger.parquet").table["partition"].to_pylist()))
    missing = next((p for p in partitions if not (root / p / GENERATIONS).is_file()), None)
    if missing:
        raise UserError(f"dir={root}: the finished partition {missing} has no {GENERATIONS}: it was removed or moved")
    return partitions


def _latest_of_each_id(ids: pa.ChunkedArray | pa.Array, index: pa.Array) -> pa.Table:
    """id, index: each id's highest index (its latest partition's, in ledger order)."""
    table = pa.table({"id": ids, "index": index}).group_by("id").aggregate([("index", "max")])
    return table.rename_columns({"index_max": "index"})


def _conform(batch: pa.RecordBatch, schema: pa.Schema, partition: str) -> pa.RecordBatch:
    """The batch as `schema`: the columns it lacks null (sample 0, as in a file written before it existed), then
    `partition`."""
    columns = []
    for field in schema:
        if field.name == "partition":
            columns.append(pa.array([partition] * batch.num_rows, pa.string()))
        elif field.name in batch.schema.names:
            columns.append(batch.column(field.name).cast(field.type))
        elif field.name == "sample":
            columns.append(pa.array([0] * batch.num_rows, field.type))
        else:
            columns.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _latest_schema(files: list[Path]) -> pa.Schema:
    """The generations' columns of every partition (a later night may keep other columns), and `partition`."""
    try:
        schema = pa.unify_schemas([pq.read_schema(f).remove_metadata() for f in files], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UserError(f"the partitions' {GENERATIONS} have columns of different types: {e}") from None
    return schema.append(pa.field("partition", pa.string()))


def _write_latest(root: Path, partitions: list[str], latest: pa.Table, path: Path) -> None:
    """Streams each partition's rows whose id is latest there into path, batch by batch."""
    files = [root / p / GENERATIONS for p in partitions]
    schema = _latest_schema(files)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for index, (partition, file) in enumerate(zip(partitions, files)):
                here = latest.filter(pc.equal(latest["index"], index))["id"].combine_chunks()
                if len(here) == 0:
                    continue
                for batch in pq.ParquetFile(file).iter_batches(batch_size=4096):
                    rows = batch.filter(pc.is_in(batch.column("id"), value_set=here))
                    if rows.num_rows:
                        writer.write_batch(_conform(rows, schema, partition))
    atomic_write(path, write)


def latest(root: str, out: str | None = None) -> dict:
    """Writes `out` (default root/latest.parquet): each id's rows (one, or sampling.n) of the latest partition of
    the nightly root that generated it, with a `partition` column. An id whose latest version failed (its
    partition's errors.parquet) keeps its earlier generation: `superseded` counts them. Returns what it wrote."""
    root = Path(root).expanduser()
    partitions = finished_partitions(root)
    order = pa.array(partitions, pa.string())
    ids = [pq.read_table(root / p / GENERATIONS, columns=["id"])["id"] for p in partitions]
    generated = _latest_of_each_id(pa.chunked_array([c for i in ids for c in i.chunks], pa.string()),
                                   np.repeat(np.arange(len(ids), dtype=np.int64), [len(i) for i in ids]))
    ledger = Ledger(root / "ledger.parquet").table
    done = _latest_of_each_id(ledger["id"], pc.index_in(ledger["partition"], value_set=order).cast(pa.int64()))
    both = generated.join(done.rename_columns({"index": "done"}), "id")
    superseded = both.filter(pc.less(both["index"], both["done"]))
    path = Path(out).expanduser() if out else root / LATEST
    _write_latest(root, partitions, generated, path)
    if superseded.num_rows:
        example = superseded.slice(0, 1).to_pylist()[0]
        log.warning("%d ids failed in their latest partition (e.g. %s in %s: see its errors.parquet); their rows in "
                    "%s are earlier generations", superseded.num_rows, example["id"], partitions[example["done"]], path)
    return {"path": str(path), "ids": generated.num_rows, "partitions": len(partitions),
            "superseded": superseded.num_rows}
