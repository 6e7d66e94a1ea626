"""The built wheel, installed in a fresh virtual env, has every module, and prompts/ and templates/ inside
`toolkit/` (not as top-level packages), where the installed package finds them.

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
import zipfile
from pathlib import Path

import pytest
from support.cli import ROOT

# Source folder -> where it lands in site-packages.
SHIPPED = {"toolkit": "toolkit", "rlhf": "rlhf", "prompts": "toolkit/prompts", "templates": "toolkit/templates"}
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
    for name in SHIPPED:
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
    python, purelib = _venv_with(venv, str(wheels[0]))
    return {"src": src, "venv": venv, "python": python, "purelib": purelib, "cwd": tmp, "wheel": wheels[0]}


def _venv_with(venv: Path, *install: str) -> tuple[Path, Path]:
    """A fresh venv with `pip install --no-deps INSTALL...`; (its python, its site-packages).

    The dependencies come first: pip runs under the venv's python, and an editable install builds there."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=venv.parent).stdout.strip())
    (purelib / "_llamakit_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", *install], cwd=venv.parent)
    return python, purelib


def test_every_sub_package_is_listed_in_pyproject():
    """pyproject.toml lists its packages (so that prompts/ and templates/ can map into toolkit/): a new
    sub-package left out of the list would be left out of the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {init.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for top in ("toolkit", "rlhf") for init in (ROOT / top).rglob("__init__.py")}
    assert found | {"toolkit.prompts", "toolkit.templates"} == listed


def test_llamakit_help_from_the_console_script(installed):
    proc = _run([str(installed["venv"] / "bin" / "llamakit"), "--help"], cwd=installed["cwd"], timeout=120)
    assert "Usage: llamakit" in proc.stdout
    from toolkit.cli import cli

    for name in cli.commands:  # every command the source tree registers is in the installed CLI
        assert f"  {name} " in proc.stdout, name
    proc = _run([str(installed["venv"] / "bin" / "llamakit"), "ask", "--help"], cwd=installed["cwd"], timeout=120)
    assert "[default: hf:smollm2-135m]" in proc.stdout


def test_every_source_and_data_file_is_installed(installed):
    for name, target in SHIPPED.items():
        shipped = _files(installed["purelib"] / target)
        missing = _files(installed["src"] / name) - shipped
        assert not missing, f"not in the wheel under {target}/: {sorted(missing)}"
    assert _files(installed["src"] / "prompts")  # and there is something to ship


def test_prompts_and_templates_ship_inside_toolkit_not_as_top_level_packages(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = wheel.namelist()
        top_level = wheel.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    assert sorted(top_level) == ["rlhf", "toolkit"]
    assert not [n for n in names if n.split("/")[0] in ("prompts", "templates")]
    assert "toolkit/prompts/judge_pairwise.txt" in names and "toolkit/prompts/constraints/bullets.txt" in names
    assert "toolkit/templates/rlhf-demo.yaml" in names and "toolkit/templates/annotate/static/app.js" in names
    assert not (installed["purelib"] / "prompts").exists() and not (installed["purelib"] / "templates").exists()


def test_installed_package_renders_prompts_and_finds_templates(installed):
    code = """
import sys
from pathlib import Path
import toolkit, toolkit.resources as r
venv = Path(sys.argv[1]).resolve()
here = Path(toolkit.__file__).resolve()
assert venv in here.parents, f"toolkit imported from {here}, not from the fresh venv"
assert r.PROMPTS.resolve() == here.parent / "prompts" and r.TEMPLATES.resolve() == here.parent / "templates"
assert venv in r.prompt_path("judge_pairwise").resolve().parents
text = r.render_prompt("judge_pairwise", prompt="What is 2+2?", response_a="4", response_b="five")
assert "What is 2+2?" in text and "five" in text and "{{" not in text, text
templates = [p for p in r.TEMPLATES.rglob("*") if p.is_file()]
if templates:
    assert all(venv in p.resolve().parents for p in templates)
    name = templates[0].relative_to(r.TEMPLATES).as_posix()
    assert r.template_path(name).read_bytes() == templates[0].read_bytes()
print(len(templates))
"""
    proc = _run([str(installed["python"]), "-I", "-c", code, str(installed["venv"])], cwd=installed["cwd"],
                timeout=120)
    assert int(proc.stdout.strip()) == len(_files(installed["src"] / "templates"))


def test_an_editable_install_reads_the_checkouts_own_folders(installed):
    """`pip install -e` (the Makefile's set-up): prompts/ and templates/ are the checkout's top-level folders."""
    python, _ = _venv_with(installed["cwd"] / "editable", "-e", str(installed["src"]))
    code = """
import toolkit.resources as r
print(r.PROMPTS.resolve(), r.TEMPLATES.resolve(), sep="\\n")
assert "five" in r.render_prompt("judge_pairwise", prompt="2+2?", response_a="4", response_b="five")
"""
    proc = _run([str(python), "-I", "-c", code], cwd=installed["cwd"], timeout=120)
    assert proc.stdout.split() == [str(installed["src"].resolve() / "prompts"),
                                   str(installed["src"].resolve() / "templates")]
