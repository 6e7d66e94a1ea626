"""toolkit/cli.py + toolkit/config.py: the click group, `--config file.yaml`, one-line errors, --debug."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from support.cli import ROOT, cli, run_cli

from rlhf.config import PPOConfig
from toolkit.cli import cli as llamakit_group
from toolkit.commands.params import pop_config
from toolkit.config import load_config
from toolkit.generate.common import Sampling, TeacherOptions
from toolkit.generate.runner import RunOptions
from toolkit.options import flag_fields
from toolkit.reward.constants import TEMPERATURE_PRIOR_SD
from toolkit.reward.train import TrainConfig
from toolkit.sft import SFTConfig

COMMANDS = sorted(llamakit_group.commands)


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command (`generate-data preferences` ...), as argument paths."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
    return paths


def _lookup(path: tuple[str, ...]) -> click.Command:
    command = llamakit_group
    for name in path:
        command = command.commands[name]
    return command


PATHS = _command_paths(llamakit_group)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- --help


def test_help_lists_every_command_and_is_fast():
    start = time.perf_counter()
    proc = run_cli("--help", timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "Usage: llamakit" in proc.stdout
    for name in ("ask", "serve", "demo", *COMMANDS):
        assert f"  {name} " in proc.stdout, name
    assert elapsed < 20, f"llamakit --help took {elapsed:.1f} s"


def test_cli_and_every_help_stay_light():
    """Importing the CLI and printing every command's help must not import torch or transformers."""
    code = (
        "import sys\n"
        "import toolkit.cli\n"
        "from click.testing import CliRunner\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, f'importing toolkit.cli imported {heavy}'\n"
        "for name in sorted(toolkit.cli.cli.commands):\n"
        "    result = CliRunner().invoke(toolkit.cli.cli, [name, '--help'])\n"
        "    assert result.exit_code == 0, (name, result.output)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, f'--help imported {heavy}'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_version():
    result = CliRunner().invoke(llamakit_group, ["--version"])
    assert result.exit_code == 0
    assert "0." in result.output


def _has_default(p: click.Parameter) -> bool:
    """Options whose default click can print: everything but no default and plain on/off flags."""
    if not isinstance(p, click.Option) or p.hidden:
        return False
    if p.default is None or type(p.default).__name__ == "Sentinel":  # click >= 8.3 marks "no default" UNSET
        return False
    return not (p.is_flag and not p.secondary_opts)


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_every_command_help_shows_its_defaults(path):
    command = _lookup(path)
    result = CliRunner().invoke(llamakit_group, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"{path[-1]} [OPTIONS]" in result.output
    options = [p for p in command.params if isinstance(p, click.Option)]
    if isinstance(command, click.Group) and not options:
        return  # a bare group of sub-commands
    assert "--config" in result.output, "every command takes --config file.yaml"
    ctx = click.Context(command, info_name=path[-1])
    missing = []
    for p in options:
        if not _has_default(p):
            continue
        opts, text = p.get_help_record(ctx)
        if "default:" not in text:
            missing.append(opts)
        assert opts.split(" ")[0] in result.output
    assert not missing, f"`llamakit {' '.join(path)} --help` does not show the default of {missing}"


def test_ask_help_shows_concrete_defaults():
    result = CliRunner().invoke(llamakit_group, ["ask", "--help"], terminal_width=200)
    assert "[default: hf:smollm2-135m]" in result.output
    assert "[default: 128; x>=1]" in result.output  # the range follows the default
    assert "[default: 0.7; x>=0]" in result.output


def test_unknown_command_and_missing_argument(capsys):
    code, _, err = cli("no-such-command")
    assert code == 2
    assert "no-such-command" in err
    code, _, err = cli("ask")
    assert code == 2
    assert "Missing argument" in err


# ---------------------------------------------------------------- --config: values and precedence


def test_config_sets_values(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", "teacher: bogus:from-config\n")
    code, _, err = cli("ask", "q", "--config", config)
    assert code == 2
    assert "bogus:from-config" in err  # the config's teacher was used


def test_flag_overrides_config(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", "teacher: bogus:from-config\n")
    # The flag wins wherever it stands, before or after --config.
    for args in (("--teacher", "rules:length", "--config", config), ("--config", config, "--teacher", "rules:length")):
        code, _, err = cli("ask", "q", *args)
        assert code == 2
        assert "bogus" not in err
        assert "rules:length" in err and "cannot write" in err


def test_config_and_flags_reach_a_real_run(capsys, tmp_path, tiny_llama_dir):
    """A real `ask` against the tiny model: the config sets teacher, token budget and --json; a flag overrides."""
    config = write(tmp_path / "c.yaml", f"teacher: hf:{tiny_llama_dir}\nmax_tokens: 3\njson: true\n"
                                        "temperature: 0\n")
    code, out, err = cli("ask", "hello", "--config", config)
    assert code == 0, err
    reply = json.loads(out)
    assert reply["completion_tokens"] == 3
    assert reply["finish_reason"] == "length"
    code, out, err = cli("ask", "hello", "--config", config, "--max-tokens", "5")
    assert code == 0, err
    assert json.loads(out)["completion_tokens"] == 5


def test_config_keys_may_use_dashes_underscores_or_flag_names(tmp_path):
    command = llamakit_group.commands["ask"]
    ctx = click.Context(command)
    config = write(tmp_path / "c.yaml", "max-tokens: 3\nteacher_kwargs: '{}'\njson: true\n--seed: 4\n")
    assert load_config(str(config), command, ctx) == {"max_tokens": 3, "teacher_kwargs": "{}", "as_json": True,
                                                      "seed": 4}


def test_empty_config_is_fine(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", "# nothing yet\n")
    code, _, err = cli("ask", "q", "--teacher", "bogus:x", "--config", config)
    assert code == 2
    assert "bogus:x" in err


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "templates").glob("*.yaml")))
def test_shipped_presets_are_valid_configs(preset):
    """Every top-level preset in templates/ loads cleanly against the command it is named after."""
    command_name = preset.split("-")[0].removesuffix(".yaml")
    if command_name not in llamakit_group.commands:
        pytest.skip(f"no `{command_name}` command")
    command = llamakit_group.commands[command_name]
    values = load_config(str(ROOT / "templates" / preset), command, click.Context(command))
    assert values


# ---------------------------------------------------------------- flags built from config dataclasses


CONFIG_COMMANDS = [(("sft",), (SFTConfig,)), (("rlhf",), (PPOConfig,)), (("train-reward",), (TrainConfig,)),
                   (("generate-data", "conversations"), (RunOptions, Sampling, TeacherOptions))]


@pytest.mark.parametrize("path, classes", CONFIG_COMMANDS, ids=[" ".join(path) for path, _ in CONFIG_COMMANDS])
def test_flags_of_a_config_take_its_defaults(path, classes):
    """One flag per flag field, named after it, with the dataclass default (written once, in the dataclass)."""
    command = _lookup(path)
    params, ctx = {p.name: p for p in command.params}, click.Context(command)
    for cls in classes:
        for f in flag_fields(cls):
            param = params[f.name]
            if param.required:
                assert f.default in (dataclasses.MISSING, ""), f.name
            else:
                assert param.get_default(ctx) == f.default, f.name


def test_shared_reward_flags_come_from_train_config():
    """calibrate and eval-reward reuse train-reward's definitions: same default, choices and range."""
    train = {p.name: p for p in llamakit_group.commands["train-reward"].params}
    for name in ("calibrate", "eval-reward"):
        params = {p.name: p for p in llamakit_group.commands[name].params}
        assert params["format"].default == "auto" and params["format"].type.choices == train["format"].type.choices
        assert params["batch_size"].default == TrainConfig.eval_batch_size
    calibrate = {p.name: p for p in llamakit_group.commands["calibrate"].params}
    assert calibrate["calibration"].opts == ["--method", "--calibration"]
    # unset: the prior of a held-out split (calibrate's pairs are one), none for cross-fitting (TrainConfig.prior_sd)
    assert calibrate["temperature_prior_sd"].default is train["temperature_prior_sd"].default is None
    assert TrainConfig(data="d", out="o").prior_sd == TEMPERATURE_PRIOR_SD


def test_grad_accum_is_a_second_spelling(tmp_path):
    """train-reward's `--gradient-accumulation-steps` (sft and rlhf name it so) still takes `--grad-accum`."""
    command = llamakit_group.commands["train-reward"]
    for flag in ("--gradient-accumulation-steps", "--grad-accum"):
        ctx = command.make_context("train-reward", ["--data", "d.jsonl", "--out", "o", flag, "3"])
        assert ctx.params["gradient_accumulation_steps"] == 3
    for key in ("grad-accum", "gradient_accumulation_steps"):
        config = write(tmp_path / "c.yaml", f"{key}: 2\n")
        assert load_config(str(config), command, click.Context(command)) == {"gradient_accumulation_steps": 2}


def test_pop_config_takes_the_flags_of_one_dataclass():
    """generate-data's shared flags go back into RunOptions / Sampling / TeacherOptions; the rest stays."""
    command = llamakit_group.commands["generate-data"].commands["instructions"]
    ctx = command.make_context("instructions", ["--seeds", "s.jsonl", "--out", "o.jsonl", "--rpm", "30",
                                                "--timeout", "5", "--teacher-kwargs", '{"a": 1}', "--retry-failed"])
    values = dict(ctx.params)
    options = pop_config(RunOptions, values)
    assert options == RunOptions(rpm=30.0, timeout=5.0, retry_failed=True)
    assert pop_config(Sampling, values) == Sampling(max_tokens=128, temperature=1.0)  # instructions' own defaults
    assert pop_config(TeacherOptions, values, timeout=options.timeout) == TeacherOptions(kwargs_json='{"a": 1}',
                                                                                         timeout=5.0)
    assert set(values) == {"seeds", "teacher", "num_instructions", "num_examples", "max_rouge", "min_words",
                           "max_words", "max_requests", "out", "fmt", "limit", "as_json"}


# ---------------------------------------------------------------- --config: errors are one line


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_key(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", "teacher: rules:length\nmax-tokenz: 3\n")
    code, _, err = cli("ask", "q", "--config", config)
    assert code == 2
    line = _one_line(err)
    assert str(config) in line
    assert "max-tokenz" in line
    assert "unknown key" in line
    assert "max-tokens" in line  # the known keys are listed, as flag names
    assert "as-json" not in line


def test_wrong_type(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", 'max-tokens: "abc"\n')
    code, _, err = cli("ask", "q", "--config", config)
    assert code == 2
    line = _one_line(err)
    assert str(config) in line
    assert "max-tokens" in line
    assert "abc" in line


def test_invalid_yaml_names_file_and_line(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", "teacher: rules:length\nmax-tokens: 3: 4\nseed: 1\n")
    code, _, err = cli("ask", "q", "--config", config)
    assert code == 2
    line = _one_line(err)
    assert f"{config}:2:" in line
    assert "invalid YAML" in line


def test_config_not_a_mapping(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", "- teacher\n- rules\n")
    code, _, err = cli("ask", "q", "--config", config)
    assert code == 2
    assert str(config) in _one_line(err)


def test_missing_config_file(capsys, tmp_path):
    code, _, err = cli("ask", "q", "--config", tmp_path / "nope.yaml")
    assert code == 2
    line = _one_line(err)
    assert "nope.yaml" in line and "not found" in line


# ---------------------------------------------------------------- errors in the real CLI process


def test_user_error_is_one_line_exit_2_without_traceback():
    proc = run_cli("ask", "q", "--teacher", "bogus:x", timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = _one_line(proc.stderr)
    assert line.startswith("error: ")
    assert "bogus" in line


def test_debug_shows_the_traceback():
    proc = run_cli("--debug", "ask", "q", "--teacher", "bogus:x", timeout=60)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UserError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_debug_from_the_environment():
    proc = run_cli("ask", "q", "--teacher", "bogus:x", env={"LLAMAKIT_DEBUG": "1"}, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_unexpected_error_is_one_line_exit_1(capsys, monkeypatch):
    # A bug, not bad input: a plain AttributeError deep inside a command, not a UserError.
    @click.command("crash")
    def crash() -> None:
        None.bind()  # noqa: B018

    monkeypatch.setitem(llamakit_group.commands, "crash", crash)
    code, _, err = cli("crash")
    assert code == 1
    line = _one_line(err)
    assert "AttributeError" in line
    assert "--debug" in line


def test_a_class_that_is_not_a_chat_model_is_refused(capsys):
    code, _, err = cli("ask", "q", "--teacher", "langchain:json:JSONDecoder")
    assert code == 2
    assert "not a LangChain chat model" in _one_line(err)
