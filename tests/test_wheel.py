"""The built wheel, installed in a fresh virtual env, has every module, prompts/ and templates/.

The sources are copied first so the build touches nothing in the repo (no build/ or egg-info churn, no
stale build/lib files slipping into the wheel). The fresh env gets the wheel only; its dependencies come
from this interpreter's site-packages through a .pth line (which does not run that directory's own .pth
files, so the editable install of the repo stays out of it).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("toolkit", "rlhf", "prompts", "templates")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), env=env, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=IGNORE)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "setup.cfg", "setup.py"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=tmp)
    wheels = list(dist.glob("llamakit-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheels[0])], cwd=tmp)
    purelib = Path(_run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())
    (purelib / "_llamakit_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    return {"src": src, "venv": venv, "python": python, "purelib": purelib, "cwd": tmp}


def test_llamakit_help_from_the_console_script(installed):
    proc = _run([str(installed["venv"] / "bin" / "llamakit"), "--help"], cwd=installed["cwd"], timeout=120)
    assert "Usage: llamakit" in proc.stdout
    from toolkit.cli import cli

    for name in cli.commands:  # every command the source tree registers is in the installed CLI
        assert f"  {name} " in proc.stdout, name
    proc = _run([str(installed["venv"] / "bin" / "llamakit"), "ask", "--help"], cwd=installed["cwd"], timeout=120)
    assert "[default: hf:smollm2-135m]" in proc.stdout


def test_every_source_and_data_file_is_installed(installed):
    for name in PACKAGES:
        shipped = _files(installed["purelib"] / name)
        missing = _files(installed["src"] / name) - shipped
        assert not missing, f"not in the wheel: {sorted(missing)}"
    assert _files(installed["src"] / "prompts")  # and there is something to ship


def test_installed_package_renders_prompts_and_finds_templates(installed):
    code = """
import sys
from pathlib import Path
import toolkit, toolkit.resources as r
venv = Path(sys.argv[1]).resolve()
here = Path(toolkit.__file__).resolve()
assert venv in here.parents, f"toolkit imported from {here}, not from the fresh venv"
assert venv in r.prompt_path("judge_pairwise").resolve().parents
text = r.render_prompt("judge_pairwise", prompt="What is 2+2?", response_a="4", response_b="five")
assert "What is 2+2?" in text and "five" in text and "{{" not in text, text
templates = [p for p in (r.ROOT / "templates").rglob("*") if p.is_file()]
if templates:
    assert all(venv in p.resolve().parents for p in templates)
    name = templates[0].relative_to(r.ROOT / "templates").as_posix()
    assert r.template_path(name).read_bytes() == templates[0].read_bytes()
print(len(templates))
"""
    proc = _run([str(installed["python"]), "-I", "-c", code, str(installed["venv"])], cwd=installed["cwd"],
                timeout=120)
    assert int(proc.stdout.strip()) == len(_files(installed["src"] / "templates"))
