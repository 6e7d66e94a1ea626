"""Issue 14, defects 1 and 2: an output path never destroys what the user had, and a generate-data output is
never silently extended with rows made under other settings. Real CLI (in-process `toolkit.cli.main`)."""

from __future__ import annotations

import json
from pathlib import Path

from support.cli import FIXTURES, cli, hh_slice


def precious(tmp_path: Path) -> Path:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes", encoding="utf-8")
    return folder


def test_train_reward_refuses_a_folder_it_did_not_write_before_training(tmp_path):
    folder = precious(tmp_path)
    data = hh_slice(tmp_path / "hh40.jsonl", 0, 40)
    for extra in ((), ("--overwrite",)):
        rc, _, err = cli("train-reward", "--data", data, "--out", folder, "--max-steps", "1", *extra)
        assert rc == 2, err
        assert "not written by llamakit" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "notes"


def test_sft_and_rlhf_refuse_a_folder_they_did_not_write(tmp_path):
    folder = precious(tmp_path)
    for command in ("sft", "rlhf"):
        for extra in ((), ("--overwrite",), ("--resume",)):
            rc, _, err = cli(command, "--out", folder, "--data" if command == "sft" else "--prompts",
                             FIXTURES / "hh-harmless-200.jsonl", *extra)
            assert rc == 2, (command, extra, err)
            assert "llamakit did not write" in err or "not written by llamakit" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def pairs_file(tmp_path: Path) -> Path:
    rows = [{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."},
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue blue blue blue blue."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_data_convert_never_replaces_what_the_user_had(tmp_path):
    src = pairs_file(tmp_path)
    folder = precious(tmp_path)
    rc, _, err = cli("data", "convert", src, folder, "--to", "hf", "--overwrite")
    assert rc == 2 and "not written by llamakit" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    hf = tmp_path / "pairs.hf"
    assert cli("data", "convert", src, hf, "--to", "hf")[0] == 0
    rc, _, err = cli("data", "convert", src, hf, "--to", "hf")
    assert rc == 2 and "--overwrite" in err, err
    assert cli("data", "convert", src, hf, "--to", "hf", "--overwrite")[0] == 0

    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own rows\n", encoding="utf-8")
    rc, _, err = cli("data", "convert", src, mine, "--to", "trl-conversational")
    assert rc == 2 and "exists already" in err, err
    assert mine.read_text(encoding="utf-8") == "my own rows\n"
    assert cli("data", "convert", src, mine, "--to", "trl-conversational", "--overwrite")[0] == 0
    assert len(mine.read_text(encoding="utf-8").splitlines()) == 2


def test_generate_data_refuses_other_settings_on_the_same_output_unless_append(tmp_path):
    """`--scorer rules:length` then `--scorer rules:length,repetition` onto one --out gave 4 rows for 2 prompts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "responses": [a, b]}) + "\n" for p, a, b in (
        ("Name a fruit.", "An apple.", "No."), ("Name a colour.", "Blue.", "Blue blue blue blue blue."))),
        encoding="utf-8")
    out = tmp_path / "prefs.jsonl"

    def run(scorer: str, *extra: str) -> tuple[int, str]:
        rc, _, err = cli("generate-data", "preferences", "--prompts", prompts, "--out", out, "--scorer", scorer,
                         "--json", *extra)
        return rc, err

    assert run("rules:length")[0] == 0
    rows = out.read_text(encoding="utf-8").splitlines()
    assert run("rules:length")[0] == 0  # the same settings: a resume, nothing added
    assert out.read_text(encoding="utf-8").splitlines() == rows
    rc, err = run("rules:length,repetition")
    assert rc == 2, err
    assert "other settings" in err and "judging.scorer: 'rules:length=1' -> 'rules:length=1,repetition=1'" in err, err
    assert len(err.strip().splitlines()) == 1
    assert out.read_text(encoding="utf-8").splitlines() == rows  # nothing written
    assert run("rules:length,repetition", "--append")[0] == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2 * len(rows)
    assert run("rules:length,repetition")[0] == 0  # both settings are now known to this output
    assert len(json.loads((tmp_path / "prefs.settings.json").read_text(encoding="utf-8"))["runs"]) == 2


def test_an_output_that_cannot_keep_rows_fails_before_any_request(tmp_path):
    """`generate-data --out` onto /dev/full sent its requests first and failed at the first write."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n", encoding="utf-8")
    full = tmp_path / "out.jsonl"
    full.symlink_to("/dev/full")
    # a teacher nobody listens on: a request would end as a failed row (exit 3), not as exit 2
    rc, _, err = cli("generate-data", "conversations", "--prompts", prompts, "--out", full, "--teacher", "openai:x",
                     "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "0", "--turns", "1")
    assert rc == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.failed.jsonl").exists()
