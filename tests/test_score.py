"""Quality against the reference: rouge-score's own F-measures, in every job's outputs (resumed, merged, nightly),
and `python -m jobs.score` over a finished directory."""

import json
import shutil
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from rouge_score.rouge_scorer import RougeScorer

from conftest import job_config, run_cli, sample_rows, write_csv
from splitwiser.errors import UserError
from splitwiser.job import run
from splitwiser.merge import merge_tasks
from splitwiser.nightly import QUALITY_SCHEMA, nightly, record_quality
from splitwiser.output import GENERATION_SCHEMA
from splitwiser.rouge import ROWS_PER_PROCESS
from splitwiser.score import METRICS, SCORE_SCHEMA, rouge_f1, score_dir

JOB = ["engine.max_new_tokens=8", "engine.batch_size=4"]


@pytest.fixture(scope="module")
def array_job(tmp_path_factory):
    """A real 2-task array job over 4 rows, merged; task-0 ran twice (its second run reuses every row)."""
    root = tmp_path_factory.mktemp("array")
    for part in (0, 1, 0):
        run(job_config("data.limit=4", "data.parts=2", f"data.part={part}", f"output.dir={root / f'task-{part}'}", *JOB))
    merge_tasks(str(root))
    return root


def test_scores_are_rouge_scores_own():
    """The F-measures of rouge-score's RougeScorer (stemmed), row for row."""
    rows = sample_rows(5)
    generations, references = [r["findings"] for r in rows], [r["impression"] for r in rows]
    scores = rouge_f1(generations, references)
    scorer = RougeScorer(list(METRICS), use_stemmer=True)
    for n, (generation, reference) in enumerate(zip(generations, references)):
        own = scorer.score(reference, generation)
        assert [scores[m][n] for m in METRICS] == [own[m].fmeasure for m in METRICS]


def test_scores_over_several_processes_are_the_same_in_the_same_order():
    """Enough rows for two processes (ROWS_PER_PROCESS each): every row's scores as one process gives them."""
    rows = sample_rows(40)
    count = 2 * ROWS_PER_PROCESS + 7
    generations = [rows[n % 40]["findings"][:60 + n % 97] for n in range(count)]
    references = [None if n % 50 == 0 else rows[(n * 7) % 40]["impression"] for n in range(count)]
    assert rouge_f1(generations, references, processes=2) == rouge_f1(generations, references)


def test_scores_worked_out_by_hand():
    scores = rouge_f1(["the cat ran", "Lung clear.", "", "anything", "anything"],
                      ["the cat sat", "The lungs are clear", "no acute process", None, "  "])
    # "the cat sat" vs "the cat ran": unigrams in common {the, cat}: P = R = 2/3, F = 2/3; bigrams {the cat} of 2
    # each: F = 1/2; the longest common subsequence "the cat": F = 2/3.
    assert [scores[m][0] for m in METRICS] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    # Stemmed, "lungs" is "lung": unigrams {lung, clear} in common, P = 2/2, R = 2/4 ("the lung are clear"),
    # F = 2PR / (P + R) = 2/3 (unstemmed only "clear": 1/3); no bigram in common; LCS "lung clear": F = 2/3. Case and
    # punctuation do not count.
    assert [scores[m][1] for m in METRICS] == pytest.approx([2 / 3, 0, 2 / 3])
    assert [scores[m][2] for m in METRICS] == [0, 0, 0]  # an empty generation scores 0
    assert [scores[m][3:] for m in METRICS] == [[None, None]] * 3  # no reference: no score


def test_a_job_scores_every_row_and_means_them(array_job):
    """Each task's generations.parquet has the three columns (task-0's rows all reused by its second run), and the
    manifests' quality holds their means; the merge scores the merged rows."""
    for directory in (array_job / "task-0", array_job / "task-1", array_job):
        table = pq.read_table(directory / "generations.parquet")
        assert table.schema.equals(pa.unify_schemas([GENERATION_SCHEMA, SCORE_SCHEMA]))
        assert all(table[m].null_count == 0 for m in METRICS)
        scores = rouge_f1(table["generation"].to_pylist(), table["reference"].to_pylist())
        assert all(table[m].to_pylist() == scores[m] for m in METRICS)
        quality = json.loads((directory / "manifest.json").read_text())["quality"]
        assert quality["rows"] == table.num_rows and quality["metric"] == "rouge-score F1, stemmed"
        assert [quality[m] for m in METRICS] == pytest.approx([pc.mean(table[m]).as_py() for m in METRICS])
    task_0 = json.loads((array_job / "task-0" / "manifest.json").read_text())
    assert task_0["runs"][1]["rows_generated"] == 0 and task_0["runs"][1]["rows_skipped_done"] == 2
    assert json.loads((array_job / "manifest.json").read_text())["quality"]["rows"] == 4


def test_score_command_rewrites_only_the_scores(array_job, tmp_path):
    out = shutil.copytree(array_job / "task-1", tmp_path / "out")
    scored, manifest = pq.read_table(out / "generations.parquet"), json.loads((out / "manifest.json").read_text())
    pq.write_table(scored.drop_columns(list(METRICS)), out / "generations.parquet")  # as before scoring
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "quality"}))
    others = {name: (out / name).read_bytes() for name in ("timing.parquet", "errors.parquet", "job.json")}

    result = run_cli(f"output.dir={out}", module="jobs.score")
    assert result.returncode == 0, result.stderr
    assert f"{out}: rouge1 {manifest['quality']['rouge1']:.3f}, rouge2 " in result.stdout
    assert "(rouge-score F1, stemmed) over 2 rows with a reference" in result.stdout
    assert pq.read_table(out / "generations.parquet").equals(scored)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert score_dir(str(out)) == manifest  # again: the same
    assert pq.read_table(out / "generations.parquet").equals(scored)
    assert others == {name: (out / name).read_bytes() for name in others}


def test_score_command_refuses_a_directory_without_outputs(tmp_path):
    result = run_cli(f"output.dir={tmp_path / 'nope'}", module="jobs.score")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: output.dir={tmp_path / 'nope'}: no generations.parquet there: give the output directory of a "
        "finished job"]


def test_a_job_without_reference_has_no_scores(tmp_path):
    out = tmp_path / "out"
    manifest = run(job_config("data.limit=2", "data.reference_column=null", f"output.dir={out}",
                              "engine.max_new_tokens=2"))
    assert pq.read_table(out / "generations.parquet").schema.equals(GENERATION_SCHEMA)
    assert "quality" not in manifest and "quality" not in json.loads((out / "manifest.json").read_text())
    with pytest.raises(UserError, match="kept no reference"):
        score_dir(str(out))


def test_nightly_quality_has_a_row_per_night(tmp_path):
    data, root = tmp_path / "reports.csv", tmp_path / "nightly"
    overrides = [f"data.path={data}", f"output.dir={root}", "engine.max_new_tokens=2"]
    for night, rows in ((date(2026, 11, 24), 2), (date(2026, 11, 25), 3)):
        write_csv(data, sample_rows(rows))
        [manifest] = nightly(job_config(*overrides), night)
    quality = pq.read_table(root / "quality.parquet")
    assert quality.schema.equals(QUALITY_SCHEMA)
    assert quality.select(["partition", "night", "rows"]).to_pylist() == [
        {"partition": "2026-11-24", "night": date(2026, 11, 24), "rows": 2},
        {"partition": "2026-11-25", "night": date(2026, 11, 25), "rows": 1}]
    assert quality.to_pylist()[1] == {"partition": "2026-11-25", "night": date(2026, 11, 25),
                                      **{k: manifest["quality"][k] for k in ("rows", *METRICS)}}
    # A partition resumed after it was recorded (killed before the ledger) replaces its row.
    record_quality(root / "quality.parquet", "2026-11-25", {"rows": 1, "rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.5})
    assert pq.read_table(root / "quality.parquet")["rouge2"].to_pylist() == [quality["rouge2"][0].as_py(), 0.25]
