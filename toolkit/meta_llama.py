"""Meta's original LLaMA 1/2 checkpoints (params.json + consolidated.NN.pth + tokenizer.model) -> a
Hugging Face directory (safetensors) that every llamakit command loads.

This is the conversion of transformers' `convert_llama_weights_to_hf` script, which transformers 5 no
longer ships in its wheel, so llamakit carries it: the same key mapping, the same rotary permutation of
wq/wk, the same way of stitching model-parallel shards. Differences: the .pth files are read with
`torch.load(weights_only=True, mmap=True)` (tensors only, no pickled code; pages read on demand), shapes
such as the MLP width come from the tensors themselves, and the output is written one safetensors
shard at a time, so peak memory is about one shard, not the whole model.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.errors import UserError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ConvertResult:
    out: Path
    layers: int
    parameters: int
    shards_in: int
    shards_out: int
    context_length: int


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rotary embedding rotates interleaved pairs (x0, x1), (x2, x3) ...; Hugging Face's rotates
    the two halves of each head. Reorder the rows of wq / wk so both compute the same attention."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _load_shards(files: list[Path]) -> list[dict[str, torch.Tensor]]:
    shards = []
    for file in files:
        try:
            shards.append(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except pickle.UnpicklingError as err:
            raise UserError(f"not a plain tensor checkpoint (llamakit loads .pth files with weights_only=True, "
                            f"so pickled code is never run): {str(err).splitlines()[0]}", file=str(file)) from None
        except RuntimeError as err:
            raise UserError(f"cannot read the checkpoint: {str(err).splitlines()[0]}", file=str(file)) from None
    return shards


Entry = tuple[str, str, str]  # (Hugging Face name, Meta key, how the shards merge)


def _tensor_plan(shards: list[dict[str, torch.Tensor]], n_layers: int) -> list[Entry]:
    """Every output tensor in file order. Model-parallel shards split the column-parallel weights (wq wk
    wv w1 w3 output) on rows and the row-parallel ones (wo w2) on columns; norms are replicated."""
    embedding = shards[0]["tok_embeddings.weight"]
    # LLaMA 1/2 split the embedding on the hidden dimension; a shard holding every hidden column splits
    # it on the vocabulary instead (and one shard needs no split at all).
    plan = [("model.embed_tokens.weight", "tok_embeddings.weight",
             "rows" if embedding.shape[1] == shards[0]["norm.weight"].shape[0] else "cols")]
    for i in range(n_layers):
        p, hf = f"layers.{i}.", f"model.layers.{i}."
        plan += [
            (hf + "self_attn.q_proj.weight", p + "attention.wq.weight", "rotary_q"),
            (hf + "self_attn.k_proj.weight", p + "attention.wk.weight", "rotary_k"),
            (hf + "self_attn.v_proj.weight", p + "attention.wv.weight", "rows"),
            (hf + "self_attn.o_proj.weight", p + "attention.wo.weight", "cols"),
            (hf + "mlp.gate_proj.weight", p + "feed_forward.w1.weight", "rows"),
            (hf + "mlp.down_proj.weight", p + "feed_forward.w2.weight", "cols"),
            (hf + "mlp.up_proj.weight", p + "feed_forward.w3.weight", "rows"),
            (hf + "input_layernorm.weight", p + "attention_norm.weight", "first"),
            (hf + "post_attention_layernorm.weight", p + "ffn_norm.weight", "first"),
        ]
    return plan + [("model.norm.weight", "norm.weight", "first"), ("lm_head.weight", "output.weight", "rows")]


def _numel(shards: list[dict[str, torch.Tensor]], entry: Entry) -> int:
    """Elements of the merged tensor, from the shapes alone (nothing is read from disk)."""
    return shards[0][entry[1]].numel() * (1 if entry[2] == "first" else len(shards))


def _build(shards: list[dict[str, torch.Tensor]], entry: Entry, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    _, key, how = entry
    if how == "first":
        return shards[0][key].clone()  # clone: a view would keep the whole mmap'd shard alive
    merged = torch.cat([s[key] for s in shards], dim=1 if how == "cols" else 0)
    if how == "rotary_q":
        return permute_rotary(merged, n_heads)
    if how == "rotary_k":
        return permute_rotary(merged, n_kv_heads)
    return merged


def _write_weights(shards: list[dict[str, torch.Tensor]], plan: list[Entry], out: Path, dtype: torch.dtype,
                   n_heads: int, n_kv_heads: int, max_shard_bytes: int) -> int:
    """Write safetensors files of at most `max_shard_bytes` each (plus an index when there are several),
    building one file's tensors at a time."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [_numel(shards, entry) * itemsize for entry in plan]
    groups: list[list[int]] = [[]]
    used = 0
    for index, size in enumerate(sizes):
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    names = (["model.safetensors"] if len(groups) == 1
             else [f"model-{n:05d}-of-{len(groups):05d}.safetensors" for n in range(1, len(groups) + 1)])
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        tensors = {plan[i][0]: _build(shards, plan[i], n_heads, n_kv_heads).to(dtype).contiguous() for i in group}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(names)


def _write_tokenizer(tokenizer_model: Path, out: Path) -> None:
    try:
        import google.protobuf  # noqa: F401 - transformers reads the .model protobuf through it
        import sentencepiece  # noqa: F401
    except ImportError:
        raise UserError("converting tokenizer.model needs sentencepiece and protobuf: "
                        "pip install sentencepiece protobuf", file=str(tokenizer_model)) from None
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained wants the file named tokenizer.model
        shutil.copyfile(tokenizer_model, Path(tmp) / "tokenizer.model")
        try:
            tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)  # Meta's encoder adds BOS too
        except ValueError as err:
            raise UserError(f"not a sentencepiece model ({err}); LLaMA 3's tiktoken tokenizer is not "
                            "supported, use Meta's Hugging Face release", file=str(tokenizer_model)) from None
    tokenizer.save_pretrained(out)


def convert_meta_llama(input_dir: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                       dtype: str = "auto", context_length: int = 0, max_shard_gb: float = 5.0,
                       overwrite: bool = False) -> ConvertResult:
    """Convert Meta's checkpoint directory `input_dir` to a Hugging Face directory `out`.

    `tokenizer`: tokenizer.model (default: looked up in `input_dir`, then its parent, Meta's layout).
    `dtype`: auto (the checkpoint's) | float16 | bfloat16 | float32. `context_length`: 0 = 2048 for
    LLaMA 1 and 4096 for LLaMA 2 (told apart by norm_eps: 1e-6 vs 1e-5).
    """
    from transformers import GenerationConfig, LlamaConfig

    from toolkit.io import atomic_dir, claim_output_dir, write_json

    src = Path(input_dir).expanduser()
    claim_output_dir(Path(out).expanduser(), "meta-llama-conversion", overwrite=overwrite)
    params_file = src / "params.json"
    if not params_file.is_file():
        raise UserError("no params.json: expected Meta's layout (params.json, consolidated.00.pth ...)",
                        file=str(src))
    files = sorted(src.glob("consolidated.*.pth"))
    if not files:
        raise UserError("no consolidated.*.pth weight files", file=str(src))
    tokenizer_model = Path(tokenizer).expanduser() if tokenizer else next(
        (d / "tokenizer.model" for d in (src, src.parent) if (d / "tokenizer.model").is_file()), None)
    if tokenizer_model is None or not tokenizer_model.is_file():
        raise UserError("no tokenizer.model here or in the parent directory; pass --tokenizer FILE",
                        file=str(tokenizer_model or src))
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    try:
        params = json.loads(params_file.read_text())
        params = params.get("model", params)
        n_layers, n_heads, dim = int(params["n_layers"]), int(params["n_heads"]), int(params["dim"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"unreadable params.json ({type(err).__name__}: {err})", file=str(params_file)) from None
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)  # LLaMA 2 70B uses grouped-query attention
    norm_eps = float(params.get("norm_eps", 1e-6))

    shards = _load_shards(files)
    missing = [k for k in ("tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight")
               if k not in shards[0]]
    if missing:
        raise UserError(f"not a Meta LLaMA checkpoint: no {missing[0]}", file=str(files[0]))
    plan = _tensor_plan(shards, n_layers)
    out_dtype = shards[0]["output.weight"].dtype if dtype == "auto" else DTYPES[dtype]
    vocab = sum(s["output.weight"].shape[0] for s in shards)
    intermediate = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards)
    context = context_length or (4096 if norm_eps >= 1e-5 else 2048)
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=intermediate,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         rms_norm_eps=norm_eps, rope_theta=float(params.get("rope_theta", 10000.0)),
                         max_position_embeddings=context, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config.dtype = out_dtype
    target = Path(out).expanduser()
    with atomic_dir(target, "meta-llama-conversion", overwrite=overwrite) as tmp:
        shards_out = _write_weights(shards, plan, tmp, out_dtype, n_heads, n_kv_heads,
                                    int(max_shard_gb * 2**30))
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        _write_tokenizer(tokenizer_model, tmp)
        write_json(tmp / "llamakit-manifest.json", {"kind": "meta-llama-conversion", "source": str(src),
                                                    "shards": [f.name for f in files], "dtype": str(out_dtype)})
    parameters = sum(_numel(shards, entry) for entry in plan)
    return ConvertResult(target, n_layers, parameters, len(files), shards_out, context)
