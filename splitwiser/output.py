"""The output directory: part files while the job runs, merged Parquet and a manifest at the end.

Every finished batch is written at once as its own part file (temp file + rename, so a killed
job never leaves a half-written file). The final merge folds parts into generations.parquet and
timing.parquet; a re-run reads the ids already there and in any parts left by a killed run,
and skips them. A row is never written twice, and never lost.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from splitwiser.config import UserError

# One row per request. A part file holds all of these; the merge splits them into two files.
GENERATION_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("reference", pa.string()),
    ("prompt", pa.string()),
    ("prompt_truncated", pa.bool_()),  # prompt.too_long=truncate cut the end of the text to fit the context
    ("generation", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("generated_tokens", pa.int32()),
    ("output_token_ids", pa.list_(pa.int32())),
    ("finish_reason", pa.string()),
    ("worker", pa.int32()),
    ("batch", pa.int64()),
])
# Milliseconds from the start of the run that produced the row (`run`: manifest's runs[n]).
TIMING_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("run", pa.int32()),
    ("worker", pa.int32()),  # the worker that decoded it (and wrote it)
    ("prefill_worker", pa.int32()),  # the worker that prefilled it: another one in mode=split
    ("gpu", pa.int32()),  # the CUDA device index of both workers (null on the CPU)
    ("batch", pa.int64()),
    ("batch_size", pa.int32()),
    ("enqueue_ms", pa.float64()),
    ("prefill_start_ms", pa.float64()),
    ("first_token_ms", pa.float64()),
    ("finish_ms", pa.float64()),
])
PART_SCHEMA = pa.unify_schemas([GENERATION_SCHEMA, TIMING_SCHEMA])
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string())])


def atomic_write(path: Path, write) -> None:
    """Calls write(temp_path) and renames the result into place. A failed write (disk full) leaves the files
    already there as they were, and ends the job with one line: a rerun resumes from them."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(unwritable(path, e)) from None
    finally:
        tmp.unlink(missing_ok=True)


def unwritable(path: Path, error: OSError) -> str:
    return (f"cannot write {path}: {error.strerror or error}; the files written before are intact: "
            "make room (or fix the directory) and rerun the job to resume")


def check_free_space(directory: Path, need_bytes: int) -> None:
    """Refuses to start a job whose outputs cannot fit, before any generation."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise UserError(f"output.dir={directory}: {free / 2**20:.1f} MB free, the job's outputs need at least "
                        f"{need_bytes / 2**20:.1f} MB: make room or give another output.dir")


def write_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


class OutputDir:
    def __init__(self, path: str, overwrite: bool):
        self.path = Path(path).expanduser()
        self.parts = self.path / "parts"
        self.error_parts = self.parts / "errors"  # rows that failed while generating (out of memory)
        try:
            if overwrite:
                shutil.rmtree(self.path, ignore_errors=True)
            self.error_parts.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output.dir={path} is not writable: {e.strerror or e}") from None

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def previous_manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None

    def check_same_job(self, fingerprint: dict) -> None:
        """Refuses to resume into a directory that holds results of a different job."""
        previous = self.previous_manifest()
        if previous is None or previous.get("fingerprint") == fingerprint:
            return
        changed = sorted(k for k in fingerprint if previous["fingerprint"].get(k) != fingerprint[k])
        raise UserError(f"output.dir={self.path} holds results of a different job (changed: {', '.join(changed)}); "
                        "give a new output.dir, or output.overwrite=true to replace them")

    def _finished_tables(self, schema: pa.Schema, name: str) -> list[pa.Table]:
        tables = [pq.read_table(p, schema=PART_SCHEMA) for p in sorted(self.parts.glob("*.parquet"))]
        tables = [t.select(schema.names) for t in tables]
        if (self.path / name).exists():
            tables.insert(0, pq.read_table(self.path / name, schema=schema))
        return tables

    def done_ids(self) -> set[str]:
        return {i for t in self._finished_tables(GENERATION_SCHEMA, "generations.parquet") for i in t["id"].to_pylist()}

    def write_part(self, rows: list[dict]) -> None:
        write_parquet(pa.Table.from_pylist(rows, schema=PART_SCHEMA), self.parts / f"{uuid.uuid4().hex}.parquet")

    def write_errors(self, rows: list[dict]) -> None:
        """Rows that failed while generating: in errors.parquet at the end, unless a later run generates them."""
        write_parquet(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), self.error_parts / f"{uuid.uuid4().hex}.parquet")

    def finalize(self, errors: pa.Table, manifest: dict) -> dict:
        """Merges parts into generations.parquet and timing.parquet, writes errors (the data's, and those
        met while generating, less any row a run has generated since) and the manifest.

        Returns the row counts of the merged files. Safe to interrupt: parts are removed only
        after the merged files are in place, and ids seen twice are kept once.
        """
        parts, error_parts = sorted(self.parts.glob("*.parquet")), sorted(self.error_parts.glob("*.parquet"))
        for schema, name in ((GENERATION_SCHEMA, "generations.parquet"), (TIMING_SCHEMA, "timing.parquet")):
            merged = pa.concat_tables(self._finished_tables(schema, name) or [schema.empty_table()])
            merged = _first_of_each_id(merged).sort_by("id")
            write_parquet(merged, self.path / name)
        # Rows that failed while generating, unless a later run generated them (the data's errors, such as a
        # duplicate id, may share an id with a generated row).
        generated = pq.read_table(self.path / "generations.parquet", columns=["id"])["id"]
        failed = pa.concat_tables([pq.read_table(p, schema=ERROR_SCHEMA) for p in error_parts]
                                  or [ERROR_SCHEMA.empty_table()])
        failed = _first_of_each_id(failed.filter(pc.invert(pc.is_in(failed["id"], value_set=generated))))
        errors = pa.concat_tables([errors.cast(ERROR_SCHEMA), failed])
        write_parquet(errors, self.path / "errors.parquet")
        for part in parts + error_parts:
            part.unlink()
        rows_ok = pq.read_metadata(self.path / "generations.parquet").num_rows
        manifest["rows"].update(ok=rows_ok, failed=errors.num_rows)
        write_json(manifest, self.manifest_path)
        return manifest


def _first_of_each_id(table: pa.Table) -> pa.Table:
    indices = pc.index_in(table["id"].unique(), value_set=table["id"])  # first index of each distinct id
    return table.take(indices)
