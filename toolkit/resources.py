"""Files shipped with the code: prompts/ (text sent to teachers) and templates/ (config presets); the one place
that finds them.

An installed wheel has them inside the package (toolkit/prompts, toolkit/templates: pyproject.toml maps the
repo's folders there); a source checkout (an editable install, `python -m toolkit` from the repo root) reads the
repo's top-level prompts/ and templates/.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from toolkit.errors import UserError


def _folder(name: str) -> Path:
    packaged = Path(files("toolkit"), name)  # toolkit is a regular package, installed unzipped: a real path
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / name


PROMPTS = _folder("prompts")
TEMPLATES = _folder("templates")


def prompt_path(name: str) -> Path:
    path = PROMPTS / (name if name.endswith(".txt") else f"{name}.txt")
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.txt")))
        raise UserError(f"no prompt named '{name}' (available: {available})")
    return path


def template_path(name: str) -> Path:
    path = TEMPLATES / name
    if not path.exists():
        raise UserError(f"no template named '{name}' under {TEMPLATES}")
    return path


def render_prompt(name_or_file: str, **variables) -> str:
    """Render a prompt (a name under prompts/ or a path to the user's own file) with Jinja2.

    A variable the prompt uses but the caller did not give is an error, never an empty string."""
    import jinja2

    file = Path(name_or_file)
    path = file if file.suffix == ".txt" and file.is_file() else prompt_path(name_or_file)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                             autoescape=False)
    try:
        return env.from_string(path.read_text(encoding="utf-8")).render(**variables).strip()
    except jinja2.UndefinedError as err:
        raise UserError(f"prompt needs a variable the caller did not give: {err.message}", file=str(path)) from None


def template_hash(name_or_file: str) -> str:
    """Short hash of a prompt's text: part of every generated row's id, so editing a prompt re-runs rows."""
    import hashlib

    file = Path(name_or_file)
    path = file if file.suffix == ".txt" and file.is_file() else prompt_path(name_or_file)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
