"""Issue 14, defects 7 and 8 (flags): every numeric flag of every command has a range checked at parse time,
no path is empty, and a bad value is one line `error: --flag: why` with exit 2, before anything loads.

The walk runs the real entry point (`toolkit.cli.main`, what the `llamakit` script calls) in this process.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import click
import pytest
from support.cli import FIXTURES, ROOT, cli

from rlhf.config import PPOConfig
from toolkit.cli import cli as llamakit_group
from toolkit.commands.params import FiniteFloat, FloatList, NonEmptyPath, NonEmptyString
from toolkit.errors import UserError
from toolkit.reward.train import TrainConfig
from toolkit.sft import SFTConfig

# Options that may take any number at all. Empty today: even seeds are 0..2^31-1. An entry here is
# (command path, flag), e.g. (("ask",), "--seed"), with a comment saying why no range fits.
UNBOUNDED: set[tuple[tuple[str, ...], str]] = set()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and sub-command, groups included (a group has options of its own: `annotate --port`)."""
    found = []
    for name, command in sorted(group.commands.items()):
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


COMMANDS = _commands(llamakit_group)


def _lookup(path: tuple[str, ...]) -> click.Command:
    return dict(COMMANDS)[path]


def _is_number(param: click.Parameter) -> bool:
    return isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))


def _flag(param: click.Parameter) -> str:
    return next(o for o in param.opts if o.startswith("--"))


def _numbers() -> list[tuple[tuple[str, ...], click.Option]]:
    return [(path, p) for path, command in COMMANDS for p in command.params
            if isinstance(p, click.Option) and _is_number(p) and not p.is_flag]


def _bad_values(param_type: click.ParamType) -> list[str]:
    """Values just outside the range (an open bound itself), and nan / inf for floats."""
    is_float = isinstance(param_type, click.types.FloatParamType)
    step = 0.5 if is_float else 1
    bad = []
    if param_type.min is not None:
        bad.append(param_type.min if param_type.min_open else param_type.min - step)
    if param_type.max is not None:
        bad.append(param_type.max if param_type.max_open else param_type.max + step)
    if is_float:
        bad += ["nan"] + ([] if param_type.allow_inf else ["inf"])
    return [str(v) for v in bad]


def assert_one_line(code: int, err: str, start: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(start), err
    return lines[0]


# ---------------------------------------------------------------- the walk


def test_the_walk_sees_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"sft", "rlhf", "serve", "annotate", "annotate progress", "generate-data preferences", "train-reward",
            "ask", "convert-llama", "chat"} <= names
    assert len(_numbers()) > 80  # the walk finds the flags it is meant to check


def test_every_number_flag_has_a_range():
    """A new int/float flag without a range fails here (or goes into UNBOUNDED with a reason)."""
    unbounded, nan_ok = [], []
    for path, p in _numbers():
        bounded = isinstance(p.type, click.types._NumberRangeBase) and (p.type.min is not None
                                                                         or p.type.max is not None)
        if not bounded and (path, _flag(p)) not in UNBOUNDED:
            unbounded.append(f"{' '.join(path)} {_flag(p)}")
        if isinstance(p.type, click.types.FloatParamType) and not isinstance(p.type, FiniteFloat):
            nan_ok.append(f"{' '.join(path)} {_flag(p)}")  # click's FloatRange lets "nan" through
    assert not unbounded, f"number flags without a range: {unbounded}"
    assert not nan_ok, f"float flags that are not FiniteFloat: {nan_ok}"


def test_every_default_is_inside_its_range():
    for _path, p in _numbers():
        if p.default is not None:
            p.type.convert(p.default, p, None)  # raises BadParameter when a default is outside


CASES = [(path, _flag(p), value) for path, p in _numbers() for value in _bad_values(p.type)]


@pytest.mark.parametrize("path, flag, value", CASES, ids=[f"{' '.join(c[0])} {c[1]} {c[2]}" for c in CASES])
def test_out_of_range_is_one_line_exit_2(capsys, path, flag, value):
    code, out, err = cli(*path, flag, value)
    assert_one_line(code, err, f"error: {flag}: ")
    assert out == ""


def test_a_value_inside_the_range_gets_past_parsing(capsys, tmp_path):
    """The check is the range, not a refusal of everything: 0 = all for --limit parses (then the missing
    prompt file is what stops the run)."""
    code, _, err = cli("generate-data", "conversations", "--prompts", tmp_path / "none.jsonl",
                        "--out", tmp_path / "out.jsonl", "--limit", "0", "--teacher", "rules:length")
    assert code == 2 and "--limit" not in err and "none.jsonl" in err, err


def _paths_and_names() -> list[tuple[tuple[str, ...], click.Parameter]]:
    return [(path, p) for path, command in COMMANDS for p in command.params
            if isinstance(p.type, (click.Path, NonEmptyString))]


def test_every_path_refuses_an_empty_string():
    plain = [f"{' '.join(path)} {p.human_readable_name}" for path, p in _paths_and_names()
             if isinstance(p.type, click.Path) and not isinstance(p.type, NonEmptyPath)]
    assert not plain, f"paths that accept '': {plain}"


EMPTY_CASES = [(path, p) for path, p in _paths_and_names() if p.name != "config"]


@pytest.mark.parametrize("path, param", EMPTY_CASES,
                         ids=[f"{' '.join(c[0])} {c[1].human_readable_name}" for c in EMPTY_CASES])
def test_empty_path_or_name_is_one_line_exit_2(capsys, path, param):
    if isinstance(param, click.Argument):  # the arguments before it get a value: IN is checked before OUT
        before = [p for p in _lookup(path).params if isinstance(p, click.Argument)]
        args, name = ["x"] * before.index(param) + [""], param.human_readable_name
    else:
        args, name = [_flag(param), ""], _flag(param)
    code, _, err = cli(*path, *args)
    line = assert_one_line(code, err, f"error: {name}: ")
    assert line.endswith("must not be empty")


def test_empty_config_path(capsys):
    code, _, err = cli("sft", "--config", "")
    assert_one_line(code, err, "error: --config: must not be empty")


# ---------------------------------------------------------------- the defects as reported


def test_limit_minus_one_is_refused_and_zero_is_documented(capsys, tmp_path):
    """--limit -1 used to drop the last row (prompts[:-1]); 0 means all and --help says so."""
    for command in (["generate-data", "conversations", "--prompts", FIXTURES / "prompts-alpaca-32.jsonl",
                     "--out", tmp_path / "c.jsonl"],
                    ["sft", "--data", FIXTURES / "alpaca-24.json", "--out", tmp_path / "sft"]):
        code, _, err = cli(*command, "--limit", "-1")
        assert_one_line(code, err, "error: --limit: -1 is not in the range x>=0")
    assert not list(tmp_path.iterdir())
    for path in (("generate-data", "conversations"), ("generate-data", "preferences"), ("sft",)):
        code, out, _ = cli(*path, "--help")
        assert code == 0 and "(0 = all)" in " ".join(out.split()), path


def test_sft_negative_max_steps_is_refused(capsys, tmp_path):
    """Used to train 0 steps, exit 0 and write the base model as if trained."""
    code, _, err = cli("sft", "--data", FIXTURES / "alpaca-24.json", "--out", tmp_path / "sft",
                        "--max-steps", "-5")
    assert_one_line(code, err, "error: --max-steps: -5 is not in the range x>=0")
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("args", [
    ["sft", "--data", str(FIXTURES / "alpaca-24.json")],
    ["rlhf", "--prompts", str(FIXTURES / "prompts-alpaca-32.jsonl")],
    ["train-reward", "--data", str(FIXTURES / "hh-harmless-6.jsonl")],
    ["generate-data", "conversations", "--prompts", str(FIXTURES / "prompts-alpaca-32.jsonl")],
], ids=lambda a: a[0])
def test_empty_out(capsys, args):
    """Used to be `ValueError: PosixPath('.') has an empty name` (after loading the model for sft)."""
    code, _, err = cli(*args, "--out", "")
    assert_one_line(code, err, "error: --out: must not be empty")


LOADS = ("torch", "transformers")
PROBE = ("import sys\nfrom toolkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
         f"    print(e.code, [m for m in {LOADS!r} if m in sys.modules])\n")


@pytest.mark.parametrize("args", [
    ["sft", "--data", str(FIXTURES / "alpaca-24.json")],
    ["train-reward", "--data", str(FIXTURES / "hh-harmless-6.jsonl")],
], ids=lambda a: a[0])
def test_negative_learning_rate_stops_before_anything_loads(args, tmp_path):
    """Used to be `ValueError: Invalid learning rate` from the optimizer, after the (default) model had loaded."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", PROBE, *args, "--out", str(out), "--learning-rate", "-1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr  # exit 2, neither torch nor transformers
    assert_one_line(2, proc.stderr, "error: --learning-rate: -1.0 is not in the range x>0")
    assert not out.exists()


def test_nan_and_inf(capsys):
    code, _, err = cli("rlhf", "--prompts", "p.jsonl", "--kl-coef", "nan")
    assert_one_line(code, err, "error: --kl-coef: 'nan' is not a finite number.")
    code, _, err = cli("generate-data", "preferences", "--prompts", "p.jsonl", "--out", "o.jsonl",
                        "--temperatures", "0.7,nan")
    assert_one_line(code, err, "error: --temperatures: 'nan' is not a finite number.")
    code, _, err = cli("generate-data", "preferences", "--prompts", "p.jsonl", "--out", "o.jsonl",
                        "--temperatures", "0.7,-1")
    assert_one_line(code, err, "error: --temperatures: -1.0 is not in the range x>=0.")
    # inf keeps its documented meaning where it has one: no prior on T, plain maximum likelihood
    param = next(p for p in llamakit_group.commands["calibrate"].params if p.name == "temperature_prior_sd")
    assert param.type.convert("inf", param, None) == math.inf
    assert FloatList(FiniteFloat(0)).convert("0.5, 1.5", None, None) == (0.5, 1.5)


def test_a_range_in_a_config_file_is_checked_too(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: -5\n")
    code, _, err = cli("sft", "--data", FIXTURES / "alpaca-24.json", "--config", config)
    line = assert_one_line(code, err, "error: ")
    assert str(config) in line and "max_steps" in line and "-5" in line


# ---------------------------------------------------------------- the Python API agrees with the CLI


@pytest.mark.parametrize("cls, command, required", [(SFTConfig, "sft", {"data": "x.jsonl"}),
                                                    (PPOConfig, "rlhf", {"prompts": "p.jsonl"}),
                                                    (TrainConfig, "train-reward", {"data": "d.jsonl", "out": "o"})])
def test_validate_refuses_what_the_cli_refuses(cls, command, required):
    """The dataclass field metadata is the one source: validate() rejects every value the flag rejects."""
    cls(**required).validate()
    params = {p.name: p for p in llamakit_group.commands[command].params}
    checked = 0
    for f in dataclasses.fields(cls):
        param = params.get(f.name)  # a few settings are Python-only (no flag)
        if param is None or not _is_number(param):
            continue
        for value in _bad_values(param.type):
            is_float = isinstance(f.default, float) or "float" in str(f.type)  # `float | None`: unset by default
            bad = float(value) if is_float else int(float(value))
            with pytest.raises(UserError, match=f"--{f.name.replace('_', '-')}: "):
                cls(**{**required, f.name: bad}).validate()
            checked += 1
    assert checked > 10
    with pytest.raises(UserError, match="--out: must not be empty"):
        cls(**{**required, "out": ""}).validate()
