"""The output directory: part files while the job runs, merged Parquet and a manifest at the end.

Every finished batch is written at once as its own part file (temp file + rename, so a killed
job never leaves a half-written file). The final merge folds parts into generations.parquet and
timing.parquet; a re-run reads the ids already there and in any parts left by a killed run,
and skips them. A row is never written twice, and never lost.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from splitwiser import reasoning
from splitwiser.errors import UserError
from splitwiser.request import Generation
from splitwiser.stop import cut

log = logging.getLogger(__name__)

# One row per request. A part file holds all of these; the merge splits them into two files.
GENERATION_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("sample", pa.int32()),  # which of the row's sampling.n samples (0 with n=1)
    ("reference", pa.string()),
    ("prompt", pa.string()),
    ("prompt_truncated", pa.bool_()),  # prompt.too_long=truncate cut the end of the text to fit the context
    ("generation", pa.string()),  # the answer (prompt.thinking=true: the text after the thinking)
    ("reasoning", pa.string()),  # prompt.thinking=true: the thinking before the answer (else null)
    ("prompt_tokens", pa.int32()),
    ("generated_tokens", pa.int32()),
    ("output_token_ids", pa.list_(pa.int32())),
    ("output_logprobs", pa.list_(pa.float32())),  # sampling.logprobs: each output token's (else null)
    ("finish_reason", pa.string()),
    ("worker", pa.int32()),
    ("batch", pa.int64()),
])
# Milliseconds from the start of the run that produced the row (`run`: manifest's runs[n]).
TIMING_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("sample", pa.int32()),
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
# sample: the one of the row's sampling.n samples that failed while generating; null: the row (every sample)
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("sample", pa.int32()), ("error", pa.string())])
JOB_ID_KEY = b"splitwiser.job_id"  # a part file's Parquet metadata: the job that wrote it (job.json's job_id)
TEMP_FILE = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # atomic_write's temporary files


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
        # On a file system gone read-only the clean-up fails too: the write's error is the one to tell.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def unwritable(path: Path, error: OSError, doing: str = "write") -> str:
    """One line naming the file, the system's reason, and what became of the files written before. pyarrow's errors
    carry a long message of their own (naming the temporary file) beside the errno: the reason is the errno's."""
    reason = os.strerror(error.errno) if error.errno else error.strerror or str(error)
    expected = [*reversed(path.parents), *([path] if doing != "write" else [])]  # a file to write is new
    gone = next((p for p in expected if not p.exists()), None)
    if gone is not None:  # removed while the job ran: the files written before went with it
        return (f"cannot {doing} {path}: {reason}: {gone} was removed while the job ran, with the rows written there; "
                "rerun the job to generate them again")
    return (f"cannot {doing} {path}: {reason}; the files written before are intact: "
            "make room (or fix the directory) and rerun the job to resume")


def why_unwritable(path: Path) -> str:
    if not path.is_dir():
        return "a file"
    # os.access says no to root too there: "not writable by this user" would send root looking at permissions
    return "on a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "not writable by this user"


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


@contextlib.contextmanager
def exclusive(directory: Path, option: str):
    """Holds an exclusive lock on directory/.lock, which the OS releases if the process dies; a second
    holder is refused with one line naming the process that has it."""
    try:
        lock = (directory / ".lock").open("a+")
    except OSError as e:
        raise UserError(f"{option}={directory} is not writable: {e.strerror or e}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise UserError(f"{option}={directory} is in use by another job (pid {holder}); wait for it to end, "
                            f"or give another {option}") from None
        except OSError as e:  # a file system without locks (some network mounts): go on, say so
            log.warning("%s=%s: cannot lock (%s); do not start a second job into it", option, directory, e)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


class OutputDir:
    """One job's output directory. Splitwiser touches only the files it writes there (OWN_FILES, and its
    temporary files); the job holds an exclusive lock on it while it runs, and job.json names the job
    (its fingerprint, an id that its part files carry, and each run as it starts and ends)."""

    OWN_FILES = {"generations.parquet", "timing.parquet", "errors.parquet", "manifest.json", "job.json", ".lock",
                 "parts", "shards", "results.jsonl"}

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        self.parts = self.path / "parts"
        self.shards = self.path / "shards"  # the run's requests (prepare.py): the map's file, the work units' files
        self.error_parts = self.parts / "errors"  # rows that failed while generating (out of memory)
        self.corrupt_parts = self.parts / "corrupt"  # unreadable parts, moved aside: their rows are generated again
        self.job_id: str | None = None  # set by start_run; written into every part file
        self.moved_aside: list[str] = []

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def identity_path(self) -> Path:
        return self.path / "job.json"

    def check(self, fingerprint: dict, overwrite: bool) -> None:
        """Everything about the directory that can refuse the job, without writing anything."""
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = why_unwritable(existing)
            raise UserError(f"output.dir={self.path} is not writable: {existing} is {why}")
        data = Path(fingerprint["data"])
        if data.is_relative_to(self.path.resolve()) and data.relative_to(self.path.resolve()).parts[0] in self.OWN_FILES:
            raise UserError(f"data.path={data} is one of the job's own output files in output.dir={self.path}, which "
                            "the job rewrites: copy it elsewhere first")
        if overwrite:
            foreign = next((p.name for p in sorted(self.path.iterdir()) if not self._is_own(p.name)), None) \
                if self.path.is_dir() else None
            if foreign:
                raise UserError(f"output.dir={self.path} holds files Splitwiser did not write (e.g. {foreign}); "
                                "output.overwrite=true replaces only a job's own outputs: give a new output.dir")
            return
        previous = self._identity() or (json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None)
        if previous is None or previous.get("fingerprint") == fingerprint:
            return
        changed = sorted(k for k in fingerprint if previous["fingerprint"].get(k) != fingerprint[k])
        raise UserError(f"output.dir={self.path} holds results of a different job (changed: {', '.join(changed)}); "
                        "give a new output.dir, or output.overwrite=true to replace them")

    def _is_own(self, name: str) -> bool:
        return name in self.OWN_FILES or TEMP_FILE.fullmatch(name) is not None

    def _identity(self) -> dict | None:
        return json.loads(self.identity_path.read_text()) if self.identity_path.exists() else None

    @contextlib.contextmanager
    def locked(self):
        """Creates the directory and holds it exclusively while the job runs. A new directory whose job is
        refused (a check that needs the prepared rows: the KV cache's size) before its first part is removed."""
        created = not self.path.exists()
        try:
            self.error_parts.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"output.dir={self.path} is not writable: {e.strerror or e}") from None
        try:
            with exclusive(self.path, "output.dir"):
                yield
        except (UserError, OSError) as e:
            if created and not any(self.parts.rglob("*.parquet")):
                shutil.rmtree(self.path, ignore_errors=True)
            said = self.failure(e) if isinstance(e, OSError) else None
            if said is not None:
                raise said from None
            raise

    def failure(self, error: OSError) -> UserError | None:
        """An OSError met in the directory other than a write's (a read, a listing, its free space) as one line;
        None if neither its file is in the directory nor the directory is gone (not the directory's doing)."""
        path = Path(os.fsdecode(error.filename)) if error.filename else None
        if path is not None and path.resolve().is_relative_to(self.path.resolve()):
            return UserError(unwritable(path, error, "use"))
        return None if self.path.exists() else UserError(unwritable(self.path, error, "use"))

    def start_run(self, fingerprint: dict, overwrite: bool, started: str) -> list[dict]:
        """Under the lock: checks the directory again, clears a replaced job's outputs and dead runs' temporary
        files, and records this run in job.json before any part is written. Returns the runs so far, this one last."""
        self.check(fingerprint, overwrite)
        if overwrite:
            self._remove_own_outputs()
        for tmp in [p for d in (self.path, self.parts, self.error_parts) for p in d.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)  # written by a run that died mid-write: no live run writes here (the lock)
        identity = self._identity()
        if identity is None:  # a new job (or a directory finished before job.json existed: its runs go on)
            previous = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}
            identity = {"fingerprint": fingerprint, "job_id": uuid.uuid4().hex, "runs": previous.get("runs", [])}
        identity["runs"].append({"started": started, "finished": False})
        write_json(identity, self.identity_path)
        self.job_id = identity["job_id"]
        return identity["runs"]

    def finish_run(self, record: dict) -> list[dict]:
        """Records this run's figures in job.json; returns every run's."""
        identity = self._identity()
        identity["runs"][-1].update(record, finished=True)
        write_json(identity, self.identity_path)
        return identity["runs"]

    def _remove_own_outputs(self) -> None:
        for name in self.OWN_FILES - {".lock"}:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.error_parts.mkdir(parents=True, exist_ok=True)

    def _readable(self, part: Path, schema: pa.Schema) -> pa.Table | None:
        """A part file of this job, or None: a part of a replaced job is removed, an unreadable one moved aside."""
        try:  # the footer first: a replaced job's part is not read whole
            ours = (pq.read_schema(part).metadata or {}).get(JOB_ID_KEY, b"").decode() == self.job_id
            table = pq.read_table(part, schema=schema) if ours else None
        except (pa.ArrowException, OSError) as e:
            self.corrupt_parts.mkdir(exist_ok=True)
            os.replace(part, self.corrupt_parts / part.name)
            self.moved_aside.append(part.name)
            log.warning("part file %s is unreadable (%s): moved to %s, its rows are generated again",
                        part.name, str(e).splitlines()[0] if str(e) else type(e).__name__, self.corrupt_parts)
            return None
        if table is None:
            part.unlink()  # left by a job this directory no longer holds (a worker that outlived it)
            return None
        return table

    def _candidates(self) -> pa.Table:
        """Every generated row on disk (the merged files and this job's parts), with its timing: PART_SCHEMA."""
        tables = [t for t in (self._readable(p, PART_SCHEMA) for p in sorted(self.parts.glob("*.parquet"))) if t]
        merged = self.path / "generations.parquet"
        if merged.exists():
            generations = read_merged(merged, GENERATION_SCHEMA)
            timing = read_merged(self.path / "timing.parquet", TIMING_SCHEMA)
            timing = timing.take(pc.index_in(_sample_keys(generations), value_set=_sample_keys(timing)))  # row for row
            columns = {**{n: timing[n] for n in TIMING_SCHEMA.names}, **{n: generations[n] for n in GENERATION_SCHEMA.names}}
            tables.insert(0, pa.table([columns[n] for n in PART_SCHEMA.names], schema=PART_SCHEMA))
        return pa.concat_tables(tables or [PART_SCHEMA.empty_table()])

    def done(self) -> dict[tuple[str, int], str]:
        """(id, sample) → the prompt its generation on disk was made from."""
        table = self._candidates()
        return dict(zip(zip(table["id"].to_pylist(), table["sample"].to_pylist()), table["prompt"].to_pylist()))

    def write_part(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=PART_SCHEMA.with_metadata({JOB_ID_KEY: self.job_id}))
        write_parquet(table, self.parts / f"{uuid.uuid4().hex}.parquet")

    def write_errors(self, rows: list[dict]) -> None:
        """Rows that failed while generating: in errors.parquet at the end, unless a later run generates them."""
        table = pa.Table.from_pylist(rows, schema=ERROR_SCHEMA.with_metadata({JOB_ID_KEY: self.job_id}))
        write_parquet(table, self.error_parts / f"{uuid.uuid4().hex}.parquet")

    def finalize(self, errors: pa.Table, wanted: pa.Table, manifest: dict, kept: pa.Table | None = None,
                 parsed: Callable[[pa.Table], pa.Table] | None = None) -> dict:
        """Merges the generations on disk whose (id, prompt) is in `wanted` (the input's rows as they are now)
        into generations.parquet and timing.parquet, writes errors (the data's, and those met while generating,
        less any row generated since) and the manifest. A row no longer in the input, or whose prompt changed,
        is left out. `kept`: output.keep_columns' values of the input's rows (an `id` column, then theirs), added to
        each generation by its id: a row generated by an earlier run gets them too. `parsed`: adds the answers'
        values (parsed.with_parsed) to generations.parquet.

        Returns the manifest, with its row counts. Safe to interrupt: parts are removed only after the merged
        files are in place, and ids seen twice are kept once.
        """
        parts, error_parts = sorted(self.parts.glob("*.parquet")), sorted(self.error_parts.glob("*.parquet"))
        rows = self._candidates()
        rows = _first_of_each_key(rows.filter(pc.is_in(_row_keys(rows), value_set=_row_keys(wanted))))
        rows = rows.sort_by([("id", "ascending"), ("sample", "ascending")])
        for schema, name in ((GENERATION_SCHEMA, "generations.parquet"), (TIMING_SCHEMA, "timing.parquet")):
            table = rows.select(schema.names).cast(schema)
            if schema is GENERATION_SCHEMA:
                table = with_kept(table, kept) if parsed is None else parsed(with_kept(table, kept))
            write_parquet(table, self.path / name)
        failed = [t for t in (self._readable(p, ERROR_SCHEMA) for p in error_parts) if t]
        failed = pa.concat_tables(failed or [ERROR_SCHEMA.empty_table()])
        still_failed = pc.and_(pc.is_in(_sample_keys(failed), value_set=_sample_keys(wanted)),
                               pc.invert(pc.is_in(_sample_keys(failed), value_set=_sample_keys(rows))))
        errors = pa.table({"id": errors["id"], "sample": pa.nulls(len(errors), pa.int32()), "error": errors["error"]})
        errors = pa.concat_tables([errors.cast(ERROR_SCHEMA), _first_of_each_key(failed.filter(still_failed))])
        errors = pa.concat_tables([errors, _unanswered(wanted, rows, errors)])
        write_parquet(errors, self.path / "errors.parquet")
        for part in parts + error_parts:
            part.unlink(missing_ok=True)
        manifest["rows"].update(ok=rows.num_rows, failed=errors.num_rows)
        write_json(manifest, self.manifest_path)
        return manifest


PARTS_PER_JOB = 1_000  # about the most part files a job writes (part_rows)


def part_rows(batch_size: int, requests: int) -> int:
    """Rows per part file: an engine batch's, or a thousandth of the job's requests where that is more (a CPU job
    of a million rows at 16 a batch wrote 62,500 files, which the merge and a resume read one by one)."""
    return max(batch_size, -(-requests // PARTS_PER_JOB))


class PartWriter:
    """Collects generations and writes them as part files of `rows` rows (part_rows), then calls
    progress(rows, tokens) and on_write(generations) with the generations written.

    A part is decoded and written on a thread while the engine goes on (in one process the GPU would
    wait for it otherwise); one part at a time, so that at most two parts' rows are held in memory.
    Use it as a context manager: leaving it waits for the writes, and the last part is written if
    nothing failed."""

    def __init__(self, out: OutputDir, tokenizer, rows: int, worker: int, gpu: int | None, run_index: int,
                 job_start_ns: int, progress, on_write=lambda written: None, stop: list[str] = (),
                 thinking: bool = False):
        self.out, self.tokenizer, self.rows, self.worker, self.gpu = out, tokenizer, rows, worker, gpu
        self.stop = list(stop)  # sampling.stop
        self.thinking_end = reasoning.end_token(tokenizer) if thinking else None  # prompt.thinking=true
        self.run_index, self.job_start_ns, self.progress, self.on_write = run_index, job_start_ns, progress, on_write
        self.finished: list[Generation] = []
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-writer")
        self.writing: tuple[Future, list] | None = None  # the part on the thread, and its rows

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, error_type, *exc) -> None:
        try:
            if error_type is None:
                self.flush()
                self.wait()
        finally:
            self.thread.shutdown(wait=True)  # a part being written is finished, even on an error

    def add(self, generation: Generation) -> None:
        self.finished.append(generation)
        if len(self.finished) >= self.rows:
            self.flush()
        elif self.writing and self.writing[0].done():
            self.wait()

    def flush(self) -> None:
        """Hands the finished rows to the thread, after the part before them is written."""
        finished, self.finished = self.finished, []
        if finished:
            self.wait()
            self.writing = self.thread.submit(self.write, finished), finished

    def wait(self) -> None:
        """Waits for the part on the thread (raising its error), then reports it."""
        if self.writing:
            (future, finished), self.writing = self.writing, None
            future.result()
            self.progress(len(finished), sum(len(g.token_ids) for g in finished))
            self.on_write(finished)

    def write(self, finished: list[Generation]) -> None:
        failed = [{"id": g.request.id, "sample": g.request.sample, "error": g.error} for g in finished if g.error]
        if failed:
            self.out.write_errors(failed)
        generated = [g for g in finished if not g.error]
        texts = self.tokenizer.batch_decode([g.token_ids for g in generated], skip_special_tokens=True)
        texts = [self.cut_at_stop(g, text) for g, text in zip(generated, texts)]
        self.out.write_part([self.row(g, *answer) for g, answer in zip(generated, self.apart(generated, texts))])

    def apart(self, generated: list[Generation], texts: list[str]) -> list[tuple[str, str | None]]:
        """Each generation's (answer, reasoning): with prompt.thinking=true, the texts after its thinking and of it."""
        if self.thinking_end is None or not generated:
            return [(text, None) for text in texts]
        thinking, answers = zip(*(reasoning.parts(g.token_ids, self.thinking_end) for g in generated))
        decode = partial(self.tokenizer.batch_decode, skip_special_tokens=True)
        return [(answer, reasoning.thinking_text(thought)) for answer, thought in zip(decode(answers), decode(thinking))]

    def cut_at_stop(self, g: Generation, text: str) -> str:
        """The text before the first stop string, and the generation's tokens up to the one that completed it."""
        found = cut(text, g.token_ids, self.stop, self.tokenizer) if self.stop else None
        if found is None:
            return text
        text, tokens = found
        g.token_ids, g.finish_reason = g.token_ids[:tokens], "stop"
        g.logprobs = g.logprobs and g.logprobs[:tokens]
        return text

    def row(self, g: Generation, text: str, thinking: str | None) -> dict:
        """A part file's row (PART_SCHEMA): the request's, its generation's, and its timing, in ms from the run's
        start."""
        ms = lambda ns: (ns - self.job_start_ns) / 1e6  # noqa: E731
        request = g.request
        return {
            "id": request.id, "sample": request.sample, "reference": request.reference, "prompt": request.prompt,
            "prompt_truncated": request.prompt_truncated, "generation": text.strip(),
            "reasoning": thinking, "prompt_tokens": request.prompt_tokens, "generated_tokens": len(g.token_ids),
            "output_token_ids": g.token_ids, "output_logprobs": g.logprobs, "finish_reason": g.finish_reason,
            "worker": self.worker, "gpu": self.gpu,
            "prefill_worker": self.worker if g.prefill_worker is None else g.prefill_worker,
            "batch": g.batch, "run": self.run_index, "batch_size": g.batch_size, "enqueue_ms": ms(g.enqueue_ns),
            "prefill_start_ms": ms(g.prefill_start_ns), "first_token_ms": ms(g.first_token_ns),
            "finish_ms": ms(g.finish_ns),
        }


def read_merged(path: Path, schema: pa.Schema) -> pa.Table:
    """A merged file as `schema`; a file written before the `sample` column (and logprobs) existed gets them."""
    return _as_schema(pq.read_table(path), schema)


def _as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`schema`'s columns of the table; those it lacks: sample 0, the others null."""
    def column(name: str) -> pa.Array | pa.ChunkedArray:
        if name in table.column_names:
            return table[name]
        if name == "sample":
            return pa.array([0] * table.num_rows, pa.int32())
        return pa.nulls(table.num_rows, schema.field(name).type)
    return pa.table([column(name) for name in schema.names], schema=schema)


def with_kept(generations: pa.Table, kept: pa.Table | None) -> pa.Table:
    """generations with the kept columns of each one's input row (kept's first row with its id), as typed there."""
    if kept is None:
        return generations
    rows = kept.take(pc.index_in(generations["id"], value_set=kept["id"]))  # null where no input row has the id
    for name in kept.column_names[1:]:
        generations = generations.append_column(kept.schema.field(name), rows[name])
    return generations


def read_generations(path: Path) -> pa.Table:
    """A generations.parquet as GENERATION_SCHEMA (read_merged), then the columns it has beyond it
    (output.keep_columns', scores) as they are."""
    whole = pq.read_table(path)  # once: the schema's columns and the others come from the same read
    table = _as_schema(whole, GENERATION_SCHEMA)
    for name in (name for name in whole.column_names if name not in GENERATION_SCHEMA.names):
        table = table.append_column(whole.schema.field(name), whole[name])
    return table


def _sample_keys(table: pa.Table) -> pa.Array:
    """A row's id and sample as one value (a row-level error, sample null, counts as sample 0)."""
    sample = pc.cast(pc.fill_null(table["sample"], 0), pa.string())
    return pc.binary_join_element_wise(table["id"], sample, "\x00")


def _row_keys(table: pa.Table) -> pa.Array:
    """A row's id, sample and prompt as one value: a generation holds for the input row with the same of these."""
    return pc.binary_join_element_wise(_sample_keys(table), table["prompt"], "\x00")


def _unanswered(wanted: pa.Table, generated: pa.Table, errors: pa.Table) -> pa.Table:
    """The wanted rows that are neither generated nor errors (no engine should leave one; if one does, the row is
    recorded, not lost, and a rerun generates it), as errors."""
    missing = wanted.filter(pc.invert(pc.is_in(_sample_keys(wanted), value_set=pa.concat_arrays(
        [_sample_keys(generated).combine_chunks(), _sample_keys(errors).combine_chunks()]))))
    if missing.num_rows:
        log.error("%d rows were neither generated nor set aside (e.g. id %s): recorded in errors.parquet; a rerun "
                  "generates them", missing.num_rows, missing["id"][0])
    reason = "not generated: the engine ended without answering it (a bug); a rerun generates it"
    return pa.table({"id": missing["id"].cast(pa.string()), "sample": missing["sample"].cast(pa.int32()),
                     "error": pa.array([reason] * missing.num_rows, pa.string())})


def _first_of_each_key(table: pa.Table) -> pa.Table:
    keys = _sample_keys(table)
    return table.take(pc.index_in(keys.unique(), value_set=keys))  # the first row of each (id, sample)
