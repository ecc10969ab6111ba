"""The nightly job: summarize only the rows that are new or changed since the last run.

    output.dir/ledger.parquet        one line per row ever done: id, key, partition
    output.dir/quality.parquet       one line per partition: its night, rows scored, ROUGE means (a drop shows)
    output.dir/2026-11-24/           one partition per night: input.parquet (its rows), then the job's
    output.dir/2026-11-25/ ...       usual files (generations.parquet, errors.parquet, manifest.json)

A row's key hashes its id, its text, the other columns its prompt names, and what would change its
summary (model, prompt, generation settings), so a changed report or a new model makes it new again. A partition enters the ledger only
once its job has finished: a night that failed or was killed is resumed by the next run, before that
run looks for new rows. Running twice with nothing new does nothing the second time.
"""

import hashlib
import json
import logging
from dataclasses import replace
from datetime import date
from pathlib import Path

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
        return set(self.table["key"].to_pylist())

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
