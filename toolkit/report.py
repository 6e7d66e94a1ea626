"""`llamakit report RUN_DIR`: report.md and a self-contained report.html (PNGs embedded) for a pipeline run.

Reads what the stages left in the run directory: data/*.jsonl, reward/ (metrics.json, reliability.png,
loss.png), ppo/ (metrics.jsonl, curves.png), compare.json (base vs policy answers) and stages/*.json
(command, seconds, result of every stage). Missing parts are skipped, so any partial run reports too.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.io import read_existing

STAGE_ORDER = ("instructions", "conversations", "preferences", "sft", "train-reward", "rlhf", "compare")
PPO_KEYS = (("objective/scores", "reward model score"), ("objective/rlhf_reward", "reward − KL penalty"),
            ("objective/kl", "KL to reference"), ("objective/entropy", "entropy"),
            ("policy/clipfrac_avg", "clip fraction"), ("val/num_eos_tokens", "responses with EOS"))


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


def _data_section(run: Path) -> Section | None:
    from toolkit.generate import stats

    blocks = []
    for name in ("instructions", "conversations", "preferences", "reward-pairs"):
        path = run / "data" / f"{name}.jsonl"
        if not path.is_file() or not read_existing(path):
            continue
        numbers = stats.compute(path)
        png = stats.plot(numbers, run / "report-files" / f"{name}.png")
        shown = [(k, v) for k, v in numbers.items() if not k.startswith("_") and k != "file"
                 and not k.endswith(("min", "max", "p90"))]
        blocks += [Block("text", f"{name}.jsonl"),
                   Block("table", header=["statistic", "value"], rows=[[k, _fmt(v)] for k, v in shown]),
                   Block("image", path=png)]
    return Section("Data", blocks) if blocks else None


def _reward_section(run: Path) -> Section | None:
    metrics_file = run / "reward" / "metrics.json"
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
        if (run / "reward" / png).is_file():
            blocks.append(Block("image", path=run / "reward" / png))
    return Section("Reward model", blocks)


def _ppo_section(run: Path) -> Section | None:
    rows = read_existing(run / "ppo" / "metrics.jsonl")
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    table = [[label, _fmt(first.get(key)), _fmt(last.get(key))] for key, label in PPO_KEYS if key in last]
    blocks = [Block("text", f"{len(rows)} PPO steps."),
              Block("table", header=["metric", "first step", "last step"], rows=table)]
    if (run / "ppo" / "curves.png").is_file():
        blocks.append(Block("image", path=run / "ppo" / "curves.png"))
    return Section("PPO", blocks)


def _compare_section(run: Path) -> Section | None:
    path = run / "compare.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    return Section("Before and after: base model vs PPO policy (greedy)", [
        Block("table", header=["prompt", "base model", "PPO policy"], wrap=True,
              rows=[[r["prompt"], r.get("base", ""), r.get("policy", "")] for r in rows])])


def build_sections(run: Path) -> list[Section]:
    stages = _stages(run)
    sections = []
    if stages:
        sections.append(Section("Stages", [Block("table", header=["stage", "seconds", "result"], rows=[
            [s["stage"], _fmt(s["seconds"]), ", ".join(f"{k} {_fmt(v)}" for k, v in list(s["result"].items())[:6]
                                                   if not isinstance(v, (dict, list)))] for s in stages])]))
    for make in (_data_section, _reward_section, _ppo_section, _compare_section):
        section = make(run)
        if section:
            sections.append(section)
    if stages:
        sections.append(Section("Settings: the command of every stage",
                                [Block("code", " ".join(s["command"])) for s in stages]))
    return sections


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


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and report.html into the run directory; return the HTML path."""
    import jinja2

    from toolkit.resources import template_path

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError("no such run directory", file=str(run))
    sections = build_sections(run)
    if not sections:
        raise UserError("nothing to report: no stages/, data/, reward/ or ppo/ outputs here", file=str(run))
    total = sum(s["seconds"] for s in _stages(run))
    title = f"llamakit run report: {run.resolve().name}"
    subtitle = f"{run.resolve()} · written {time.strftime('%Y-%m-%d %H:%M')} · stages took {total:.0f} s in all"
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(template_path("report.html").read_text(encoding="utf-8")).render(
        title=title, subtitle=subtitle, sections=sections)
    (run / "report.md").write_text(_markdown(title, subtitle, sections, run), encoding="utf-8")
    out = run / "report.html"
    out.write_text(html, encoding="utf-8")
    return out


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
