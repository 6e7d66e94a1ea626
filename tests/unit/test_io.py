"""toolkit/io.py: row files in, crash-safe rows out, atomic directories and JSON files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.cli import ROOT

from toolkit.errors import UserError
from toolkit.io import (
    RowWriter,
    atomic_dir,
    claim_output_dir,
    claim_run_dir,
    located_rows,
    output_kind,
    read_existing,
    read_rows,
    require_new_file,
    require_str,
    start_run_dir,
    write_json,
)

ROWS = [{"prompt": "hi", "n": 1}, {"prompt": "café ☕", "n": 2}]


# ---------------------------------------------------------------- read_rows: the three layouts


def test_read_rows_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n", encoding="utf-8")
    assert read_rows(path) == ROWS


def test_read_rows_jsonl_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(json.dumps(r) for r in ROWS).encode())
    assert read_rows(path) == ROWS


def test_read_rows_json_array(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert read_rows(path) == ROWS


def test_read_rows_json_array_in_a_jsonl_named_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert read_rows(path) == ROWS


def test_read_rows_json_object_holding_one_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"version": 3, "name": "x", "data": ROWS}), encoding="utf-8")
    assert read_rows(path) == ROWS


def test_read_rows_json_object_with_two_lists_is_ambiguous(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}), encoding="utf-8")
    with pytest.raises(UserError, match="expected a JSON array"):
        read_rows(path)


# ---------------------------------------------------------------- read_rows: errors name file and line


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file") as err:
        read_rows(tmp_path / "nope.jsonl")
    assert err.value.file == str(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty") as err:
        read_rows(path)
    assert str(path) in str(err.value)
    assert read_rows(path, allow_empty=True) == []


def test_empty_json_array(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(UserError, match="no rows"):
        read_rows(path)
    assert read_rows(path, allow_empty=True) == []


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,,}\n{"a": 4}\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_rows(path)
    message = str(err.value)
    assert f"{path}:4:" in message
    assert "invalid JSON" in message
    assert "\n" not in message
    assert err.value.line == 4


def test_invalid_json_document_names_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match="invalid JSON") as err:
        read_rows(path)
    assert f"{path}:4:" in str(err.value)


def test_wrong_encoding_names_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "ok"}\n' + '{"a": "café"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8") as err:
        read_rows(path)
    assert f"{path}:3:" in str(err.value)


def test_jsonl_file_named_json(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="looks like JSONL") as err:
        read_rows(path)
    assert f"{path}:2:" in str(err.value)


def test_jsonl_row_that_is_not_an_object_names_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(UserError, match="expected a JSON object") as err:
        read_rows(path)
    assert f"{path}:3:" in str(err.value)
    assert "list" in str(err.value)


def test_json_array_item_that_is_not_an_object_names_the_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"a": 1}, "oops"]', encoding="utf-8")
    with pytest.raises(UserError, match=r"row 2 is str, expected a JSON object") as err:
        read_rows(path)
    assert str(path) in str(err.value)


def test_bad_lines_are_set_aside_when_a_list_is_given(tmp_path):
    from toolkit.io import located_rows

    jsonl, array = tmp_path / "rows.jsonl", tmp_path / "rows.json"
    jsonl.write_text('{"a": 1}\n[2]\n{"a": 3}\n{"a": ', encoding="utf-8")
    array.write_text('[{"a": 1}, "oops"]', encoding="utf-8")
    bad: list[str] = []
    assert [row["a"] for row, _ in located_rows(jsonl, bad_lines=bad)] == [1, 3]
    assert bad == [f"{jsonl}:2: row is list, expected a JSON object", f"{jsonl}:4: invalid JSON: Expecting value "
                   "(column 7)"]
    bad = []
    assert [row["a"] for row, _ in located_rows(array, bad_lines=bad)] == [1]
    assert bad == [f"{array}: row 2 is str, expected a JSON object"]
    jsonl.write_text("[1]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"no good row: all 1 set aside"):
        located_rows(jsonl, bad_lines=[])


# ---------------------------------------------------------------- require_str


def test_require_str_returns_the_value():
    assert require_str({"prompt": "hello"}, "prompt", "d.jsonl", 3) == "hello"
    assert require_str({"prompt": ""}, "prompt", "d.jsonl", 3, allow_empty=True) == ""


@pytest.mark.parametrize(("row", "what"), [
    ({"other": "x"}, "missing"),
    ({"prompt": 3}, "expected a string, got int"),
    ({"prompt": None}, "expected a string, got NoneType"),
    ({"prompt": ["a"]}, "expected a string, got list"),
    ({"prompt": "  \n"}, "empty string"),
])
def test_require_str_errors_name_file_line_and_field(row, what):
    with pytest.raises(UserError) as err:
        require_str(row, "prompt", "data/d.jsonl", 7)
    assert str(err.value) == f"data/d.jsonl:7: field 'prompt': {what}"
    assert (err.value.file, err.value.line, err.value.field) == ("data/d.jsonl", 7, "prompt")


# ---------------------------------------------------------------- RowWriter


def test_row_writer_flushes_every_row(tmp_path):
    path = tmp_path / "out" / "deep" / "rows.jsonl"  # parents are created
    with RowWriter(path) as writer:
        writer.write(ROWS[0])
        # Visible to another reader before close: flushed (and fsync'd) row by row.
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == ROWS[:1]
        writer.write(ROWS[1])
        assert read_rows(path) == ROWS
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert "café ☕" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes


def test_row_writer_appends_to_existing_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowWriter(path) as writer:
        writer.write(ROWS[0])
    with RowWriter(path) as writer:
        writer.write(ROWS[1])
    assert read_rows(path) == ROWS


@pytest.mark.parametrize("torn", [
    b'{"prompt": "half a ro',  # killed mid-write: no newline
    b'{"prompt": "x"',  # no newline, unparsable
    b'{"prompt": "x", \n',  # a newline but invalid JSON
    b"\x00\x00\x00\x00\n",  # NUL bytes a crash can leave on some file systems
])
def test_row_writer_cuts_a_torn_last_line(tmp_path, torn):
    path = tmp_path / "rows.jsonl"
    good = (json.dumps(ROWS[0]) + "\n").encode()
    path.write_bytes(good + torn)
    assert len(read_existing(path)) == 1  # readers tolerate it too
    with RowWriter(path) as writer:
        assert path.read_bytes() == good  # cut on open, before anything is appended
        writer.write(ROWS[1])
    assert read_rows(path) == ROWS


def test_row_writer_cuts_a_lone_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"pro')
    with RowWriter(path) as writer:
        writer.write(ROWS[0])
    assert read_rows(path) == ROWS[:1]


def test_row_writer_keeps_complete_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    content = "".join(json.dumps(r) + "\n" for r in ROWS)
    path.write_text(content, encoding="utf-8")
    with RowWriter(path):
        pass
    assert path.read_text(encoding="utf-8") == content


def test_second_writer_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowWriter(path) as first:
        first.write(ROWS[0])
        with pytest.raises(UserError, match="another llamakit process") as err:
            RowWriter(path)
        assert str(path) in str(err.value)
        first.write(ROWS[1])
    # Released on close: a later writer gets the file.
    with RowWriter(path) as again:
        again.write(ROWS[0])
    assert read_rows(path) == [ROWS[0], ROWS[1], ROWS[0]]


def test_second_process_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    child = textwrap.dedent(f"""
        import sys
        from toolkit.errors import UserError
        from toolkit.io import RowWriter
        try:
            RowWriter({str(path)!r}).write({{"from": "child"}})
        except UserError as err:
            print(err)
            sys.exit(3)
    """)
    with RowWriter(path) as writer:
        writer.write(ROWS[0])
        proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert "another llamakit process" in proc.stdout
        writer.write(ROWS[1])
    assert read_rows(path) == ROWS  # the child wrote nothing
    # Once the first process has closed it, another process may append.
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_rows(path) == [*ROWS, {"from": "child"}]


def test_unwritable_output_under_a_regular_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(UserError, match="cannot") as err:
        RowWriter(blocker / "out" / "rows.jsonl")
    assert "a-file" in str(err.value)
    with pytest.raises(UserError, match="cannot"):
        RowWriter(blocker / "rows.jsonl")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into chmod 500 directories")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot") as err:
            RowWriter(locked / "rows.jsonl")
        assert "locked" in str(err.value)
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- atomic_dir, write_json


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_dir_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target, "model") as tmp:
        assert tmp.is_dir() and tmp != target
        assert not target.exists()  # invisible until complete
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}", encoding="utf-8")
    assert (target / "weights.bin").read_bytes() == b"w"
    assert (target / "sub" / "config.json").is_file()
    assert _entries(tmp_path) == ["model"]  # no temp dir left behind
    assert output_kind(target) == "model"  # marked as llamakit's own


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target, "model") as tmp:
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert _entries(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target, "model") as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
        raise KeyboardInterrupt
    assert _entries(target) == ["old.txt"]
    assert _entries(tmp_path) == ["model"]


def test_atomic_dir_refuses_a_directory_it_did_not_write(tmp_path):
    """Issue 14 defect 1: `train-reward --out precious` deleted precious/notes.txt."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("notes", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not written by llamakit"):
            claim_output_dir(target, "model", overwrite=overwrite)
        with pytest.raises(UserError, match="written beside it"), \
                atomic_dir(target, "model", overwrite=overwrite) as tmp:
            (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert (target / "notes.txt").read_text(encoding="utf-8") == "notes"
    assert _entries(tmp_path) == ["precious", "precious-2", "precious-3"]  # the finished work is kept beside
    assert (tmp_path / "precious-2" / "new.txt").is_file()


def test_atomic_dir_replaces_its_own_output_only_with_overwrite(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target, "model") as tmp:
        (tmp / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(UserError, match="--overwrite"):
        claim_output_dir(target, "model")
    with pytest.raises(UserError, match="holds a model, not a dataset"):
        claim_output_dir(target, "dataset", overwrite=True)
    with atomic_dir(target, "model", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert _entries(target) == ["llamakit-manifest.json", "new.txt"]
    assert _entries(tmp_path) == ["model"]  # neither temp nor backup left


def test_empty_or_missing_directories_are_free(tmp_path):
    claim_output_dir(tmp_path / "missing", "model")
    (tmp_path / "empty").mkdir()
    claim_output_dir(tmp_path / "empty", "model")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="not a directory"):
        claim_output_dir(tmp_path / "file", "model")


def test_run_dirs_resume_or_overwrite_their_own_kind_only(tmp_path):
    out = tmp_path / "run"
    claim_run_dir(out, "sft-run", resume=False, overwrite=False)
    start_run_dir(out, "sft-run", overwrite=False)
    (out / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        claim_run_dir(out, "sft-run", resume=False, overwrite=False)
    claim_run_dir(out, "sft-run", resume=True, overwrite=False)
    with pytest.raises(UserError, match="not a rlhf-run"):
        claim_run_dir(out, "rlhf-run", resume=True, overwrite=False)
    with pytest.raises(UserError, match="choose one"):
        claim_run_dir(out, "sft-run", resume=True, overwrite=True)
    claim_run_dir(out, "sft-run", resume=False, overwrite=True)
    start_run_dir(out, "sft-run", overwrite=True)
    assert _entries(out) == ["llamakit-manifest.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x", encoding="utf-8")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(UserError):
            claim_run_dir(mine, "sft-run", resume=resume, overwrite=overwrite)
    assert _entries(mine) == ["notes.txt"]


def test_require_new_file(tmp_path):
    path = tmp_path / "a.jsonl"
    require_new_file(path)
    path.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="--overwrite"):
        require_new_file(path)
    require_new_file(path, overwrite=True)


def test_atomic_dir_has_normal_permissions(tmp_path):
    """The renamed directory is as readable as one made with mkdir (not mkdtemp's private 0700)."""
    reference = tmp_path / "reference"
    reference.mkdir()
    with atomic_dir(tmp_path / "model", "model") as tmp:
        (tmp / "f").write_text("x", encoding="utf-8")
    assert (tmp_path / "model").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_atomic_dir_unwritable_parent(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="cannot write output"), atomic_dir(blocker / "model", "model"):
        pass


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1, "name": "café"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "name": "café"}
    write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": [1, 2]}
    assert _entries(tmp_path) == ["metrics.json"]  # temp file renamed away


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serializable: fails before anything is replaced
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1}
    assert _entries(tmp_path) == ["metrics.json"]


def test_located_rows_name_lines_and_rows(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert [loc for _, loc in located_rows(jsonl)] == [{"file": str(jsonl), "line": 1}, {"file": str(jsonl), "line": 3}]
    array = tmp_path / "a.json"
    array.write_text('[{"x": 1}, {"x": 2}]')
    assert [loc for _, loc in located_rows(array)] == [{"file": f"{array} (row 1)"}, {"file": f"{array} (row 2)"}]


def test_a_broken_parquet_file_is_one_line(tmp_path):
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError) as err:
        read_rows(bad)
    assert str(err.value).startswith(f"{bad}: cannot read Parquet: ") and "\n" not in str(err.value)
