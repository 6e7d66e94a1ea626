"""`llamakit convert-llama` on a tiny fake Meta checkpoint built from a random LLaMA: the converted
Hugging Face model must compute the same logits, and the tokenizer the same ids as sentencepiece."""

from __future__ import annotations

import json

import pytest
import torch
from support.cli import run_cli

from toolkit.errors import UserError

DIM, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 96


def meta_layout(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the converter's rotary permutation: Hugging Face rows -> Meta's interleaved rows."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model, folder, n_shards: int) -> None:
    """Split a Hugging Face LLaMA the way Meta's model-parallel checkpoints are split."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # (tensor, the dimension model parallelism splits: None = replicated on every shard)
    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
            "norm.weight": (sd["model.norm.weight"], None), "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(LAYERS):
        hf = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": (meta_layout(sd[hf + "self_attn.q_proj.weight"], HEADS), 0),
            f"layers.{i}.attention.wk.weight": (meta_layout(sd[hf + "self_attn.k_proj.weight"], KV_HEADS), 0),
            f"layers.{i}.attention.wv.weight": (sd[hf + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[hf + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[hf + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[hf + "mlp.down_proj.weight"], 1),
            f"layers.{i}.feed_forward.w3.weight": (sd[hf + "mlp.up_proj.weight"], 0),
            f"layers.{i}.attention_norm.weight": (sd[hf + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[hf + "post_attention_layernorm.weight"], None),
        })
    folder.mkdir(parents=True)
    for shard in range(n_shards):
        part = {k: (w if dim is None else w.chunk(n_shards, dim)[shard]).clone() for k, (w, dim) in full.items()}
        torch.save(part, folder / f"consolidated.{shard:02d}.pth")
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "vocab_size": -1,
              "multiple_of": 32, "norm_eps": 1e-5}
    (folder / "params.json").write_text(json.dumps(params))


def train_sentencepiece(path) -> None:
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers reads the .model protobuf through it
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=f, vocab_size=64,
                                       model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_convert_llama_reproduces_the_model_and_tokenizer(tmp_path, n_shards):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    (tmp_path / "llama").mkdir()  # Meta's layout: tokenizer.model beside the 7B/ 13B/ ... folders
    train_sentencepiece(tmp_path / "llama" / "tokenizer.model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    original = LlamaForCausalLM(config).eval()
    write_meta_checkpoint(original, tmp_path / "llama" / "7B", n_shards)

    if n_shards == 1:  # the function the command calls ...
        from toolkit.meta_llama import convert_meta_llama

        summary = vars(convert_meta_llama(tmp_path / "llama" / "7B", tmp_path / "hf", max_shard_gb=0.0001))
    else:  # ... and the real CLI, as a user runs it
        proc = run_cli("convert-llama", "--input-dir", tmp_path / "llama" / "7B", "--out", tmp_path / "hf",
                       "--max-shard-gb", "0.0001", "--json", check=True)
        summary = json.loads(proc.stdout)
    assert summary["shards_in"] == n_shards and summary["shards_out"] > 1  # tiny limit: several files + index
    assert summary["parameters"] == sum(p.numel() for p in original.parameters())
    assert summary["context_length"] == 4096  # norm_eps 1e-5: LLaMA 2
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    converted = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert converted.config.intermediate_size == FFN and converted.config.num_key_value_heads == KV_HEADS
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)

    import sentencepiece as spm

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama" / "tokenizer.model"))
    text = "the lazy fox jumps"
    assert tokenizer(text).input_ids == [sp.bos_id(), *sp.encode(text)]  # Meta's encoder puts BOS first
    assert tokenizer.eos_token_id == converted.config.eos_token_id == 2


def test_convert_llama_bad_input_is_one_clear_line(tmp_path):
    from toolkit.meta_llama import convert_meta_llama

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("convert-llama", "--input-dir", empty, "--out", tmp_path / "hf")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {empty}: no params.json: expected Meta's layout "
                                                "(params.json, consolidated.00.pth ...)"]
    (empty / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    (empty / "consolidated.00.pth").write_bytes(b"\x80\x04not a zip checkpoint")
    (empty / "tokenizer.model").write_bytes(b"")
    with pytest.raises(UserError, match=r"consolidated\.00\.pth: cannot read the checkpoint"):
        convert_meta_llama(empty, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
