"""Bad input, swept over every command that reads a file: each case must end in exit code != 0 and exactly
one line on stderr that names the file (and the line, and the field where there is one); no traceback.

Commands run in this process through `toolkit.cli.main` (torch is imported once, so ~150 cases take
seconds); a case that slipped through and started work (or annotate's web server) hits the timeout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import FIXTURES

from toolkit.cli import main

pytestmark = pytest.mark.timeout(120)

NOWHERE = "http://127.0.0.1:9/v1"  # nothing listens: a bad file must stop the run before any request


@dataclass(frozen=True)
class Command:
    name: str
    args: Callable[[Path, Path, dict], list[str]]  # (bad file, tmp dir, shared dirs) -> argv
    row: dict  # a valid input row
    key: str  # the field the field-level cases break


def _gen(sub: str, flag: str, *extra: str) -> Callable[[Path, Path, dict], list[str]]:
    return lambda f, tmp, _d: ["generate-data", sub, flag, str(f), "--out", str(tmp / "out.jsonl"),
                               "--base-url", NOWHERE, *extra]


PAIR = {"prompt": "What is rain?", "chosen": "Water falling from clouds.", "rejected": "No idea."}
COMMANDS = [
    Command("generate-data instructions", _gen("instructions", "--seeds", "--teacher", "openai:x"),
            {"instruction": "Name a fruit."}, "instruction"),
    Command("generate-data conversations", _gen("conversations", "--prompts", "--teacher", "openai:x"),
            {"prompt": "Name a fruit."}, "prompt"),
    Command("generate-data preferences", _gen("preferences", "--prompts", "--teacher", "openai:x",
                                              "--scorer", "rules:length"), {"prompt": "Name a fruit."}, "prompt"),
    Command("generate-data scores", _gen("scores", "--prompts", "--judge", "openai:x"),
            {"prompt": "Name a fruit.", "response": "A pear."}, "prompt"),
    Command("train-reward", lambda f, tmp, d: ["train-reward", "--data", str(f), "--out", str(tmp / "rm"),
                                               "--model", str(d["llama"])], PAIR, "chosen"),
    Command("eval-reward", lambda f, tmp, d: ["eval-reward", str(d["rm"]), "--data", str(f)], PAIR, "chosen"),
    Command("calibrate", lambda f, tmp, d: ["calibrate", str(d["rm"]), "--data", str(f)], PAIR, "chosen"),
    Command("sft", lambda f, tmp, d: ["sft", "--data", str(f), "--model", str(d["llama"]), "--out",
                                      str(tmp / "sft")], {"prompt": "Hi", "response": "Hello!"}, "response"),
    Command("rlhf", lambda f, tmp, d: ["rlhf", "--prompts", str(f), "--policy", str(d["llama"]), "--out",
                                       str(tmp / "rlhf")], {"prompt": "Name a fruit."}, "prompt"),
    Command("data stats", lambda f, tmp, _d: ["data", "stats", str(f), "--png", str(tmp / "s.png")],
            {"prompt": "Hi", "response": "Hello!"}, "prompt"),
    Command("data convert", lambda f, tmp, _d: ["data", "convert", str(f), str(tmp / "c.jsonl"), "--to",
                                                "sharegpt"], {"prompt": "Hi", "response": "Hello!"}, "prompt"),
    Command("annotate", lambda f, tmp, _d: ["annotate", "--tasks", str(f), "--db", str(tmp / "a.sqlite"),
                                            "--port", "0"],
            {"prompt": "Name a fruit.", "candidates": ["A pear.", "An apple."]}, "prompt"),
]


def _lines(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@dataclass(frozen=True)
class Case:
    name: str
    filename: str
    content: Callable[[Command], bytes]
    where: Callable[[Path, Command], str]  # a regex the error line must match
    field: bool = False  # the line must also name the broken field


def _at(line: int) -> Callable[[Path, Command], str]:
    return lambda f, _c: re.escape(str(f)) + f":{line}: "


def _file(f: Path, _c: Command) -> str:
    return re.escape(str(f)) + r"(:\d+)?: "


def _row_with(c: Command, value) -> dict:
    return {**c.row, c.key: value}


def _without(c: Command) -> dict:
    return {k: v for k, v in c.row.items() if k != c.key} or {"unrelated": "x"}


CASES = [
    Case("empty file", "in.jsonl", lambda c: b"", _file),
    Case("blank lines only", "in.jsonl", lambda c: b"\n\n  \n", _file),
    Case("invalid JSON at line 3", "in.jsonl",
         lambda c: (_lines(c.row, c.row) + json.dumps(c.row)[:-4] + "\n").encode(), _at(3)),
    Case("latin-1 bytes at line 2", "in.jsonl",
         lambda c: _lines(c.row).encode() + json.dumps(_row_with(c, "caf\u00e9"), ensure_ascii=False)
         .encode("latin-1") + b"\n", _at(2)),
    Case("JSON array of strings", "in.jsonl", lambda c: b'["one", "two"]\n', _file),
    Case("JSONL in a .json file", "in.json", lambda c: _lines(c.row, c.row, c.row).encode(), _at(2)),
    Case("truncated JSON array", "in.json", lambda c: ("[" + json.dumps(c.row) + ",\n" + json.dumps(c.row)[:9])
         .encode(), _at(2)),
    Case("row that is not an object", "in.jsonl", lambda c: (_lines(c.row) + "42\n").encode(), _at(2)),
    Case("missing field", "in.jsonl", lambda c: _lines(c.row, _without(c)).encode(), _file),
    Case("mistyped field", "in.jsonl", lambda c: _lines(c.row, _row_with(c, 5)).encode(), _file, field=True),
    Case("empty string", "in.jsonl", lambda c: _lines(c.row, _row_with(c, "  ")).encode(), _file, field=True),
]


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA and a tiny reward model trained on it for one step (the commands check them first)."""
    from toolkit.reward.train import TrainConfig, train_reward

    rm = tmp_path_factory.mktemp("bad-input") / "rm"
    train_reward(TrainConfig(data=str(FIXTURES / "hh-harmless-6.jsonl"), out=str(rm), model=str(tiny_llama_dir),
                             max_length=32, batch_size=4, epochs=1, max_steps=1, eval_split=0.5,
                             show_progress=False))
    return {"llama": tiny_llama_dir, "rm": rm}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `llamakit ARGV`, run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, pattern: str) -> str:
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_bad_files_are_one_line_naming_file_line_and_field(command, dirs, tmp_path, capsys):
    failures = []
    for case in CASES:
        work = tmp_path / re.sub(r"\W+", "-", case.name)
        work.mkdir()
        bad = work / case.filename
        bad.write_bytes(case.content(command))
        code, stderr = run(command.args(bad, work, dirs), capsys)
        try:
            line = assert_one_line(code, stderr, case.where(bad, command))
            if case.field:
                assert command.key in line, line
        except AssertionError as err:
            failures.append(f"{case.name}: {err}")
        assert not (work / "out.jsonl").exists() and not (work / "rm").exists()  # nothing written
    assert not failures, "\n".join(failures)


CONFIGS = [
    ("unknown key", "bogus_key: 1\n", "field 'bogus_key': unknown key"),
    ("wrong type", "batch_size: many\n", "field 'batch_size': wrong type"),
    ("invalid YAML", "batch_size: [1\n", r":2: invalid YAML"),
    ("not a mapping", "- 1\n- 2\n", "expected a mapping"),
]


@pytest.mark.parametrize("argv", [["sft", "--data", "x.jsonl"], ["rlhf"], ["train-reward", "--data", "x", "--out", "y"],
                                  ["generate-data", "conversations", "--prompts", "x", "--out", "y"]],
                         ids=lambda a: " ".join(a[:2]))
def test_bad_config_yaml(argv, tmp_path, capsys):
    for name, text, message in CONFIGS:
        config = tmp_path / f"{name.replace(' ', '-')}.yaml"
        config.write_text(text)
        if argv[0] == "generate-data" and "batch_size" in text:
            config.write_text(text.replace("batch_size", "concurrency"))
            message = message.replace("batch_size", "concurrency")
        code, stderr = run([*argv, "--config", str(config)], capsys)
        assert_one_line(code, stderr, re.escape(str(config)) + ".*" + message)


@pytest.fixture(scope="module")
def broken_models(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken-models")
    empty = root / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    bad_config = root / "bad-config"
    shutil.copytree(tiny_llama_dir, bad_config)
    (bad_config / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": "many"}))
    truncated = root / "truncated"
    shutil.copytree(tiny_llama_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    not_json = root / "not-json"
    shutil.copytree(tiny_llama_dir, not_json)
    (not_json / "config.json").write_text("{ not json")
    return {"no config.json": empty, "wrong config.json": bad_config, "truncated weights": truncated,
            "config.json not JSON": not_json}


MODEL_COMMANDS = [
    ("sft", lambda m, tmp: ["sft", "--data", str(FIXTURES / "alpaca-24.json"), "--model", str(m), "--out",
                            str(tmp / "o")]),
    ("rlhf", lambda m, tmp: ["rlhf", "--prompts", str(FIXTURES / "prompts-alpaca-32.jsonl"), "--policy", str(m),
                             "--out", str(tmp / "o")]),
    ("rlhf critic", lambda m, tmp: ["rlhf", "--prompts", str(FIXTURES / "prompts-alpaca-32.jsonl"), "--critic",
                                    str(m), "--out", str(tmp / "o")]),
    ("train-reward", lambda m, tmp: ["train-reward", "--data", str(FIXTURES / "hh-harmless-6.jsonl"), "--model",
                                     str(m), "--out", str(tmp / "o")]),
    ("eval-reward", lambda m, tmp: ["eval-reward", str(m), "--data", str(FIXTURES / "hh-harmless-6.jsonl")]),
    ("rlhf reward", lambda m, tmp: ["rlhf", "--prompts", str(FIXTURES / "prompts-alpaca-32.jsonl"), "--reward",
                                    str(m), "--out", str(tmp / "o")]),
    ("hf teacher", lambda m, tmp: ["generate-data", "conversations", "--prompts",
                                   str(FIXTURES / "prompts-alpaca-32.jsonl"), "--teacher", f"hf:{m}", "--out",
                                   str(tmp / "o.jsonl")]),
]


@pytest.mark.parametrize("name, argv", MODEL_COMMANDS, ids=[c[0] for c in MODEL_COMMANDS])
def test_a_directory_that_is_not_a_model(name, argv, broken_models, tiny_llama_dir, tmp_path, capsys):
    failures = []
    for kind, model in broken_models.items():
        args = argv(model, tmp_path / re.sub(r"\W+", "-", kind))
        if name in ("rlhf critic", "rlhf reward"):
            args += ["--policy", str(tiny_llama_dir)]
        code, stderr = run(args, capsys)
        try:
            assert_one_line(code, stderr, re.escape(str(model)))
        except AssertionError as err:
            failures.append(f"{kind}: {err}")
    assert not failures, "\n".join(failures)


def test_reward_dir_with_a_calibration_of_other_weights(dirs, tmp_path, capsys):
    from toolkit.reward.train import TrainConfig, train_reward

    other = tmp_path / "other"
    train_reward(TrainConfig(data=str(FIXTURES / "hh-harmless-6.jsonl"), out=str(other), model=str(dirs["llama"]),
                             max_length=32, batch_size=4, epochs=1, max_steps=1, eval_split=0.5, seed=7,
                             show_progress=False))
    shutil.copy(dirs["rm"] / "calibration.json", other / "calibration.json")
    calibration = re.escape(str(other / "calibration.json")) + ": field 'fingerprint'"
    for argv in (["eval-reward", str(other), "--data", str(FIXTURES / "hh-harmless-6.jsonl")],
                 ["rlhf", "--policy", str(dirs["llama"]), "--reward", str(other), "--prompts",
                  str(FIXTURES / "prompts-alpaca-32.jsonl"), "--out", str(tmp_path / "ppo")]):
        assert_one_line(*run(argv, capsys), calibration)
    (other / "calibration.json").write_text('{"method": "temperature", "temperature": -1}')
    argv = ["eval-reward", str(other), "--data", str(FIXTURES / "hh-harmless-6.jsonl")]
    assert_one_line(*run(argv, capsys), re.escape(str(other / "calibration.json")))
    assert not (tmp_path / "ppo").exists()
