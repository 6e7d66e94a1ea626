"""`llamakit report PATH`: report.md and a self-contained report.html (PNGs embedded).

PATH is a pipeline run (what `demo` and `init` lay out): data/*.jsonl, sft/ (metrics.jsonl, curves.png),
reward/ (metrics.json, reliability.png, loss.png), ppo/ (metrics.jsonl, curves.png, samples.jsonl),
compare.json (base vs policy answers) and stages/*.json (command, seconds, result of every stage); or the
output directory of one stage (rlhf, sft, train-reward), read the same way; or one data file (any format
`data stats` reads), reported beside it as NAME.report.html. Missing parts are skipped, so any partial or
interrupted run reports too.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.console import redact
from toolkit.errors import UserError
from toolkit.io import read_existing

STAGE_ORDER = ("instructions", "conversations", "preferences", "sft", "train-reward", "rlhf", "compare",
               "constraints", "rlhf-constraints", "eval-policy")
ALGO_NAMES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO"}
PPO_KEYS = (("objective/scores", "reward model score"), ("objective/rlhf_reward", "reward − KL penalty"),
            ("objective/kl", "KL to reference"), ("objective/entropy", "entropy"),
            ("policy/clipfrac_avg", "clip fraction"), ("val/num_eos_tokens", "responses with EOS"))
SFT_KEYS = ("loss", "grad_norm", "lr", "epoch", "tokens")
SAMPLES_SHOWN = 4


@dataclass
class Block:
    kind: str  # text | code | image | table
    text: str = ""
    path: Path | None = None
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    wrap: bool = False

    @property
    def alt(self) -> str:
        return self.path.stem if self.path else ""

    @property
    def data(self) -> str:
        return base64.b64encode(self.path.read_bytes()).decode() if self.path else ""


@dataclass
class Section:
    title: str
    blocks: list[Block]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _stages(run: Path) -> list[dict]:
    found = {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json")}
    return [found[s] for s in STAGE_ORDER if s in found] + [v for k, v in found.items() if k not in STAGE_ORDER]


def _data_blocks(path: Path, png: Path, label: str) -> list[Block]:
    from toolkit.generate import stats

    numbers = stats.compute(path)
    shown = [(k, v) for k, v in numbers.items() if not k.startswith("_") and k != "file"
             and not k.endswith(("min", "max", "p90"))]
    return [Block("text", label),
            Block("table", header=["statistic", "value"], rows=[[k, _fmt(v)] for k, v in shown]),
            Block("image", path=stats.plot(numbers, png))]


def _data_section(run: Path) -> Section | None:
    blocks = []
    for name in ("instructions", "conversations", "preferences", "reward-pairs"):
        path = run / "data" / f"{name}.jsonl"
        if path.is_file() and read_existing(path):
            blocks += _data_blocks(path, run / "report-files" / f"{name}.png", f"{name}.jsonl")
    return Section("Data", blocks) if blocks else None


def _reward_section(stage: Path) -> Section | None:
    """A train-reward output directory: backbone, held-out metrics raw and calibrated, plots."""
    metrics_file = stage / "metrics.json"
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    heldout = metrics.get("heldout") or {}
    blocks = [Block("text", f"Backbone {metrics.get('settings', {}).get('model', '?')}; "
                            f"{metrics.get('train', {}).get('pairs', '?')} training pairs; "
                            f"held-out pairs: {heldout.get('n', heldout.get('raw', {}).get('n', '?'))}; "
                            f"calibration: {metrics.get('calibration', {}).get('method', '?')} "
                            f"(T = {_fmt(metrics.get('calibration', {}).get('temperature'))}).")]
    raw, calibrated = heldout.get("raw") or {}, heldout.get("calibrated") or {}
    keys = [k for k in ("accuracy", "ece", "brier", "nll", "auc", "n") if k in raw or k in calibrated]
    if keys:
        blocks.append(Block("table", header=["held-out metric", "raw", "calibrated"],
                            rows=[[k, _fmt(raw.get(k)), _fmt(calibrated.get(k))] for k in keys]))
    for png in ("reliability.png", "loss.png"):
        if (stage / png).is_file():
            blocks.append(Block("image", path=stage / png))
    return Section("Reward model", blocks)


def _metric_rows(stage: Path) -> list[dict]:
    return [r for r in read_existing(stage / "metrics.jsonl") if isinstance(r.get("step"), int)]


def _ppo_section(stage: Path) -> Section | None:
    """An rlhf output directory: TRL's metrics at the first and last step, curves, the last samples."""
    rows = [r for r in _metric_rows(stage) if "objective/kl" in r]
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    table = [[label, _fmt(first.get(key)), _fmt(last.get(key))] for key, label in PPO_KEYS if key in last]
    blocks = [Block("text", f"{len(rows)} PPO steps."),
              Block("table", header=["metric", "first step", "last step"], rows=table)]
    if (stage / "curves.png").is_file():
        blocks.append(Block("image", path=stage / "curves.png"))
    samples = [s for s in read_existing(stage / "samples.jsonl") if s.get("step") == last["step"]]
    if samples:
        blocks += [Block("text", f"Answers sampled at step {last['step']}:"),
                   Block("table", header=["prompt", "response", "score"], wrap=True,
                         rows=[[str(s.get("prompt", "")), str(s.get("response", "")), _fmt(s.get("score"))]
                               for s in samples[:SAMPLES_SHOWN]])]
    return Section("PPO", blocks)


def _sft_section(stage: Path) -> Section | None:
    """An sft output directory: loss at the first and last step, the loss curve, the data it read."""
    rows = [r for r in _metric_rows(stage) if "loss" in r and "objective/kl" not in r]
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    table = [[key, _fmt(first.get(key)), _fmt(last.get(key))] for key in SFT_KEYS if key in last]
    blocks = [Block("text", f"{len(rows)} SFT steps."),
              Block("table", header=["metric", "first step", "last step"], rows=table)]
    run_file = stage / "run.json"
    data = json.loads(run_file.read_text()).get("data") if run_file.is_file() else None
    if isinstance(data, dict) and data:
        blocks.append(Block("table", header=["training data", "value"],
                            rows=[[k, _fmt(v)] for k, v in data.items() if not isinstance(v, (dict, list))]))
    if (stage / "curves.png").is_file():
        blocks.append(Block("image", path=stage / "curves.png"))
    return Section("SFT", blocks)


def _compare_section(run: Path) -> Section | None:
    path = run / "compare.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    return Section("Before and after: base model vs PPO policy (greedy)", [
        Block("table", header=["prompt", "base model", "PPO policy"], wrap=True,
              rows=[[r["prompt"], r.get("base", ""), r.get("policy", "")] for r in rows])])


def _change(after: Any, before: Any, digits: int = 3) -> str:
    if not isinstance(after, (int, float)) or not isinstance(before, (int, float)):
        return ""
    return f"{after - before:+.{digits}f}"


def _headline_section(run: Path, stages: list[dict]) -> Section | None:
    """An eval-policy output (`eval/` in a pipeline run): before → after on held-out prompts, per constraint
    family, and answers side by side. A demo report opens with it."""
    from toolkit.eval_policy import answer_pairs, kl_text, win_rows

    summary_file = run / "eval" / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    after, before = summary["policy"], summary.get("baseline") or {}
    metrics = [(f"constraints met ({summary['scorer']}, the gold)", "scorer", 3), ("reward-model score", "reward", 3),
               ("words", "words", 1), ("answers ending with EOS", "eos_rate", 3)]
    rows = [[label, _fmt(before.get(key)), _fmt(after.get(key)), _change(after.get(key), before.get(key), digits)]
            for label, key, digits in metrics if after.get(key) is not None]
    rows.append(["KL(after ‖ before)", "0", kl_text(summary), ""])
    rows += [[label, "", text, ""] for label, text in win_rows(summary)]
    trained = next((s["result"] for s in stages if s["stage"] == "rlhf-constraints"), {})
    guided = " (with revised answers)" if trained.get("guide", "none") != "none" else ""
    method = ALGO_NAMES.get(trained.get("algo", "ppo"), "RL") + guided
    blocks = [Block("text", f"{summary['prompts']} held-out instructions (no training stage saw them), one answer "
                            f"each at temperature {summary['temperature']}, at most {summary['max_new_tokens']} "
                            f"tokens. Before: {before.get('model', '?')}. After: {trained.get('steps', '?')} "
                            f"{method} steps on the checker (rules:constraints) from it. Win rate: 95% Wilson "
                            f"interval, ties count ½. This few prompts tell a large change from noise, not a small "
                            f"one; benchmarks/rlhf_effect.py measures on 400 (docs/rlhf-effect.md)."),
              Block("table", header=["held-out", "before", "after", "change"], rows=rows)]
    families = after.get("per_family") or {}
    if families:
        blocks.append(Block("table", header=["constraint family", "n", "before", "after"], rows=[
            [kind, _fmt(after["family_answers"][kind]), _fmt(before.get("per_family", {}).get(kind)),
             _fmt(families[kind])] for kind in families]))
    shown = [[p["prompt"], f"{p['baseline']}\n\n[{_fmt(p['baseline_score'])}]",
              f"{p['policy']}\n\n[{_fmt(p['policy_score'])}]"]
             for p in answer_pairs(read_existing(run / "eval" / "answers.jsonl"), SAMPLES_SHOWN)]
    if shown:
        blocks.append(Block("table", header=["held-out prompt", "before", "after"], rows=shown, wrap=True))
    return Section("Headline: before → after on held-out instructions", blocks)


def build_sections(run: Path) -> list[Section]:
    """Sections for a pipeline run (stages/, data/, sft/, reward/, ppo/ as `demo` and `init` lay them out)
    or for the output of one stage (an rlhf, sft or train-reward directory)."""
    stages = _stages(run)
    headline = _headline_section(run, stages)
    sections = [headline] if headline else []
    if stages:
        sections.append(Section("Stages", [Block("table", header=["stage", "seconds", "result"], rows=[
            [s["stage"], _fmt(s["seconds"]), ", ".join(f"{k} {_fmt(v)}" for k, v in list(s["result"].items())[:6]
                                                   if not isinstance(v, (dict, list)))] for s in stages])]))
    pipeline = [_data_section(run), _sft_section(run / "sft"), _reward_section(run / "reward"),
                _ppo_section(run / "ppo"), _compare_section(run)]
    one_stage = [_sft_section(run), _reward_section(run), _ppo_section(run)]
    sections += [s for s in pipeline + one_stage if s]
    if stages:
        sections.append(Section("Settings: the command of every stage",
                                [Block("code", redact(" ".join(s["command"]))) for s in stages]))
    return sections


def _data_file_sections(path: Path) -> list[Section]:
    """A data file of any supported format (a generate-data output, a conversion)."""
    return [Section("Data", _data_blocks(path, _beside(path, ".report.png"), path.name))]


def _beside(path: Path, suffix: str) -> Path:
    """prefs.jsonl -> prefs.report.html beside it (not report.html: a pipeline run's own report may be there)."""
    return path.with_name(path.stem + suffix)


def _markdown(title: str, subtitle: str, sections: list[Section], run: Path) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for b in section.blocks:
            if b.kind == "text":
                lines += [b.text, ""]
            elif b.kind == "code":
                lines += [f"`{b.text}`", ""]
            elif b.kind == "image":
                lines += [f"![{b.alt}]({b.path.relative_to(run) if b.path.is_relative_to(run) else b.path})", ""]
            else:
                def cell(v: str) -> str:
                    return v.replace("|", "\\|").replace("\n", "<br>")
                lines += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b.rows]
                lines.append("")
    return "\n".join(lines)


def write_report(target: str | Path) -> Path:
    """Write the report as Markdown and self-contained HTML; return the HTML path. `target` is a pipeline
    run directory, one stage's output directory (rlhf, sft, train-reward): report.md and report.html in it;
    or a data file: NAME.report.md and NAME.report.html beside it."""
    import jinja2

    from toolkit.resources import template_path

    target = Path(target)
    if target.is_file():
        sections, base = _data_file_sections(target), target.parent
        md, html_path, kind = _beside(target, ".report.md"), _beside(target, ".report.html"), "data"
    elif target.is_dir():
        sections, base = build_sections(target), target
        md, html_path, kind = target / "report.md", target / "report.html", "run"
        if not sections:
            raise UserError("nothing to report: not a pipeline run (stages/, data/, reward/, ppo/), nor an rlhf, "
                            "sft or train-reward output, nor a data file", file=str(target))
    else:
        raise UserError("no such run directory or data file", file=str(target))
    total = sum(s["seconds"] for s in _stages(base)) if kind == "run" else 0
    title = f"llamakit {kind} report: {target.resolve().name}"
    subtitle = f"{target.resolve()} · written {time.strftime('%Y-%m-%d %H:%M')}"
    if total:
        subtitle += f" · stages took {total:.0f} s in all"
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(template_path("report.html").read_text(encoding="utf-8")).render(
        title=title, subtitle=subtitle, sections=sections)
    md.write_text(_markdown(title, subtitle, sections, base), encoding="utf-8")
    html_path.write_text(html, encoding="utf-8")
    return html_path


def screenshot(html: str | Path, png: str | Path, width: int = 1200, height: int = 3000) -> Path:
    """Render a page with headless Chromium (Debian's /usr/bin/chromium) to a PNG, as a person would see it."""
    import shutil
    import subprocess
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        raise UserError("no Chromium found; install it (Debian: apt-get install chromium)")
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", Path(html).resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png
