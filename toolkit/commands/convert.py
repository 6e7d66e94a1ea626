"""`llamakit convert-llama`: Meta's original LLaMA checkpoints -> a Hugging Face directory."""

from __future__ import annotations

import click

from toolkit.commands.params import FiniteFloat, NonEmptyPath
from toolkit.config import config_option


@click.command("convert-llama")
@config_option
@click.option("--input-dir", required=True, type=NonEmptyPath(file_okay=False),
              help="Meta's model directory: params.json and consolidated.00.pth (.01 ... for 13B and up).")
@click.option("--out", required=True, type=NonEmptyPath(), help="Hugging Face directory to write (safetensors).")
@click.option("--tokenizer", default=None, type=NonEmptyPath(dir_okay=False),
              help="tokenizer.model [default: looked up in --input-dir, then its parent].")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
              help="Weight dtype of the output (auto keeps the checkpoint's, float16 for Meta's files).")
@click.option("--context-length", default=0, type=click.IntRange(0), show_default=True,
              help="max_position_embeddings (0: 2048 for LLaMA 1, 4096 for LLaMA 2).")
@click.option("--max-shard-gb", default=5.0, type=FiniteFloat(0, min_open=True), show_default=True,
              help="Largest safetensors file written.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier conversion in --out (a directory llamakit did not write is never replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def convert_llama_cmd(input_dir: str, out: str, tokenizer: str | None, dtype: str, context_length: int,
                      max_shard_gb: float, overwrite: bool, as_json: bool) -> None:
    """Convert Meta's original LLaMA 1/2 weights (what ChatLLaMA asked for) for every llamakit command.

    The .pth files are read with torch.load(weights_only=True): tensors only, no pickled code runs.
    Needs RAM for about one output shard plus the pages of the inputs being read (they are mmap'd).
    """
    from toolkit.console import console, emit_json
    from toolkit.meta_llama import convert_meta_llama

    result = convert_meta_llama(input_dir, out, tokenizer=tokenizer, dtype=dtype, context_length=context_length,
                                max_shard_gb=max_shard_gb, overwrite=overwrite)
    summary = {"out": str(result.out), "layers": result.layers, "parameters": result.parameters,
               "shards_in": result.shards_in, "shards_out": result.shards_out,
               "context_length": result.context_length}
    if as_json:
        emit_json(summary)
    else:
        console.print(f"wrote {result.out} ({result.parameters / 1e6:.1f}M parameters, {result.layers} layers, "
                      f"{result.shards_in} Meta shard(s) -> {result.shards_out} safetensors file(s))")


COMMANDS = [convert_llama_cmd]
