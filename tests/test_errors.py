"""User mistakes end in one clear line (exit 2, no traceback) before any work is done."""

import os

import pytest

from conftest import run_cli, sample_rows, write_csv


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def test_missing_input_file(tmp_path):
    assert_user_error(run_cli(f"data.path={tmp_path}/nope.csv", f"output.dir={tmp_path}/o"),
                      "nope.csv: no such file or directory")


def test_unknown_column_lists_the_columns(tmp_path):
    assert_user_error(run_cli("data.text_column=report", f"output.dir={tmp_path}/o"),
                      "data.text_column=report: no such column", "id, modality, indication, comparison, findings, impression")


def test_unknown_model_name(tmp_path):
    result = run_cli("model=gpt9", f"output.dir={tmp_path}/o")
    assert_user_error(result, "model=gpt9: no such choice; the choices are: opt125m, smollm2_135m")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_hub_model_offline_says_what_to_do(tmp_path):
    assert_user_error(run_cli("model=opt125m", f"output.dir={tmp_path}/o"),
                      "model.path=facebook/opt-125m", "unreachable", "model.path=LOCAL_DIR", "model=smollm2_135m")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("id,findings,impression\n")
    assert_user_error(run_cli(f"data.path={empty}", f"output.dir={tmp_path}/o"), "no rows")


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(run_cli(f"data.path={empty}", f"output.dir={tmp_path}/o"), "empty.jsonl")


def test_unknown_format(tmp_path):
    path = tmp_path / "reports.xlsx"
    path.write_bytes(b"PK\x03\x04")
    assert_user_error(run_cli(f"data.path={path}", f"output.dir={tmp_path}/o"), "unknown format '.xlsx'")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; the file-as-directory case covers it")
def test_output_dir_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_user_error(run_cli(f"output.dir={locked}/o"), "is not writable")


def test_output_dir_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run_cli(f"output.dir={blocker}/o", "data.limit=1"), "is not writable")


@pytest.mark.parametrize("override, message", [
    ("procs=0", "procs=0: must be auto or at least 1"),
    (("procs=auto", "mode=split"), "procs=auto chooses between one process and colocated workers; mode=split needs"),
    ("engine.batch_size=-1", "engine.batch_size=-1: must be auto or at least 1"),
    ("engine.batch_size=many", "engine.batch_size=many: must be auto or at least 1"),
    ("engine.kv_tokens=0", "engine.kv_tokens=0: must be auto or at least 1"),
    ("engine.share_prefix=maybe", "engine.share_prefix: Value 'maybe' is not a valid bool"),
    ("model.dtype=float8", "model.dtype=float8 is not one of"),
    ("prompt.template='{text} {date}'", "prompt: the placeholder {date} names no column of the dataset; the columns"),
    ("prompt.template='no fields'", "prompt.template has no placeholder: name a column"),
    (("mode=split", "engine.kind=generate"), "mode=split hands KV slots over: it needs engine.kind=continuous"),
    (("procs=2", "prompt_procs=1"), "prompt_procs and token_procs are for mode=split"),
    ("data.part=3", "data.part=3: must be 0 to data.parts-1 (0)"),
    ("gpus=0", "gpus=0: must be auto, a count (gpus=2) or a list of GPU indices (gpus=[0,1])"),
    ("gpus=2", "gpus=2 but no CUDA GPU is visible here; use gpus=auto"),
    (("gpus=[0]", "model.device=cpu"), "gpus=[0] chooses GPUs and model.device=cpu one device"),
])
def test_nonsensical_config_values(tmp_path, override, message):
    overrides = (override,) if isinstance(override, str) else override
    assert_user_error(run_cli(*overrides, f"output.dir={tmp_path}/o"), message)


def test_resuming_into_a_different_job_is_refused(tmp_path):
    data = write_csv(tmp_path / "d.csv", sample_rows(1))
    first = run_cli(f"data.path={data}", f"output.dir={tmp_path}/o", "engine.max_new_tokens=2")
    assert first.returncode == 0, first.stderr
    assert_user_error(run_cli(f"data.path={data}", f"output.dir={tmp_path}/o", "engine.max_new_tokens=3"),
                      "holds results of a different job (changed: max_new_tokens)", "output.overwrite=true")


def test_a_loop_of_symbolic_links_as_data_path(tmp_path):
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    assert_user_error(run_cli(f"data.path={loop}", f"output.dir={tmp_path}/o"), "a loop of symbolic links")
    assert not (tmp_path / "o").exists()


def test_split_mode_refuses_a_model_the_fast_engine_cannot_run(tmp_path, default_model):
    """mode=split hands KV slots over, which only the fast engine has: a family without an adapter (GPT-2 here) is
    refused in one line, and no output dir is left behind (the other modes fall back to generate)."""
    assert_user_error(run_cli("mode=split", "model.weights=random", "model.path=gpt2", "model.architecture=gpt2",
                              f"model.tokenizer={default_model.source}", "data.limit=2", "engine.max_new_tokens=2",
                              f"output.dir={tmp_path}/o"),
                      "mode=split hands KV slots over, which needs the fast engine: model type gpt2 is not supported")
    assert not (tmp_path / "o").exists()
