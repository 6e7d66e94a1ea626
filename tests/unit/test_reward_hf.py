"""Issue 18: a reward model is a transformers sequence classifier, both ways.

- What `train-reward` writes loads with plain `AutoModelForSequenceClassification` (so in TRL) and gives
  llamakit's raw rewards, for an encoder (tiny BERT) and a causal backbone (tiny LLaMA, whose tokenizer pads
  with EOS), right- and (causal) left-padded batches of several lengths.
- A `*ForSequenceClassification` llamakit did not train is scored too: settings inferred, identity calibration
  with a one-line warning.
- A format-1 directory (backbone config + reward_head.safetensors) still scores as it did.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from toolkit.errors import UserError

PROMPTS = ["How do I bake bread?", "hi", "Tell me, in detail, about a dragon who learned to fly over the cold sea"]
RESPONSES = ["Mix flour, water and yeast; bake at 230 C for half an hour.", "hello",
             "Once upon a time there was a small dragon."]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from support.tiny_models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


def _train(backbone: Path, out: Path, **extra):
    from support.cli import FIXTURES

    from toolkit.reward.train import TrainConfig, train_reward

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_reward(TrainConfig(data=str(FIXTURES / "hh-harmless-200.jsonl"), out=str(out),
                                        model=str(backbone), max_length=48, batch_size=8, max_steps=2,
                                        eval_split=0.2, learning_rate=1e-3, show_progress=False, **extra))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_dirs(tiny_bert_dir, tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-rm")
    _train(tiny_bert_dir, root / "bert")
    _train(tiny_llama_dir, root / "llama", lora=True, lora_r=4)  # LoRA: merged into the saved weights
    return {"bert": root / "bert", "llama": root / "llama"}


def _hf_scores(directory: Path, texts: list[str], padding_side: str = "right") -> tuple[list[float], torch.Tensor]:
    """Rewards from plain transformers; a causal model's texts end with EOS, as llamakit and TRL write them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = padding_side
    if _causal(model):
        texts = [t + tokenizer.eos_token for t in texts]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return logits[:, 0].tolist(), batch["attention_mask"]


def _causal(model) -> bool:
    from toolkit.reward.model import is_causal

    return is_causal(model.config)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_trained_reward_dir_is_a_standard_sequence_classifier(trained_dirs, kind):
    from toolkit.reward import load_reward_model

    out = trained_dirs[kind]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"bert": "BertForSequenceClassification",
                                        "llama": "LlamaForSequenceClassification"}[kind]]
    assert config["id2label"] == {"0": "reward"} and config["pad_token_id"] is not None
    assert not (out / "reward_head.safetensors").exists()
    assert json.loads((out / "reward_config.json").read_text())["format_version"] == 2

    rm = load_reward_model(str(out))
    texts = rm.texts(PROMPTS, RESPONSES)
    ours = rm.raw_scores(PROMPTS, RESPONSES, batch_size=3)  # one batch, padded to its longest text
    sides = ["right", "left"] if kind == "llama" else ["right"]  # an encoder's tokenizer pads right
    for side in sides:
        theirs, mask = _hf_scores(out, texts, side)
        assert (mask == 0).any()  # padding really is exercised
        assert theirs == pytest.approx(ours, abs=1e-5), side
    assert len(set(ours)) == 3


def test_a_causal_reward_model_gets_a_pad_token_other_than_eos(trained_dirs, tiny_llama_dir):
    """SmolLM2's tokenizer pads with EOS, the token llamakit reads the reward at: transformers, which reads at
    the last token that is not `pad_token_id`, would take the token before it."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_llama_dir).pad_token_id == AutoTokenizer.from_pretrained(
        tiny_llama_dir).eos_token_id
    out = trained_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_llama_dir))  # unk reused, no new token


def test_a_tokenizer_without_unk_gets_an_added_pad_token(tiny_llama_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from toolkit.reward.model import new_reward_model

    backbone = tmp_path / "no-unk"
    shutil.copytree(tiny_llama_dir, backbone)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.unk_token = None
    tokenizer.save_pretrained(backbone)
    assert AutoTokenizer.from_pretrained(backbone).unk_token is None
    net, tok, _ = new_reward_model(str(backbone))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == len(tok) - 1 != tok.eos_token_id
    assert net.model.get_input_embeddings().num_embeddings == len(tok)
    assert net.model.config.pad_token_id == tok.pad_token_id


def _foreign(directory: Path, kind: str, num_labels: int = 1) -> Path:
    from support.reward_models import save_foreign_reward_model

    return save_foreign_reward_model(directory, kind, num_labels)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_sequence_classifier_llamakit_did_not_train_is_scored_raw_with_a_warning(tmp_path, capsys, kind):
    from toolkit.reward import load_reward_model

    out = _foreign(tmp_path / "rm", kind)
    capsys.readouterr()
    rm = load_reward_model(str(out))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "no calibration.json" in err and "llamakit calibrate" in err
    assert rm.settings.read_at == ("first" if kind == "bert" else "last")
    raw = rm.raw_scores(PROMPTS, RESPONSES, batch_size=3)
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx(raw, abs=1e-6)  # identity calibration
    theirs, mask = _hf_scores(out, rm.texts(PROMPTS, RESPONSES))
    assert (mask == 0).any() and theirs == pytest.approx(raw, abs=1e-5)


def test_rlhf_reward_accepts_a_foreign_sequence_classifier(tmp_path):
    from rlhf.rewards import make_reward_fn

    out = _foreign(tmp_path / "rm", "llama")
    scores = make_reward_fn(str(out))(PROMPTS, RESPONSES, ["stop"] * 3)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)


def test_a_dir_that_is_not_a_reward_model_is_one_line(tiny_llama_dir, tmp_path):
    from toolkit.reward import load_reward_model

    with pytest.raises(UserError, match=r"not a reward model: config.json says LlamaForCausalLM") as err:
        load_reward_model(str(tiny_llama_dir))
    assert "\n" not in str(err.value)
    two = _foreign(tmp_path / "two", "bert", num_labels=2)
    with pytest.raises(UserError, match="num_labels 2 .*a reward model has 1"):
        load_reward_model(str(two))


def _old_fingerprint(directory: Path) -> str:
    """Format 1's fingerprint, spelled out: calibration.json files written then must still match."""
    digest = hashlib.sha256((directory / "reward_head.safetensors").read_bytes())
    for weights in sorted(directory.glob("*.safetensors")):
        if weights.name != "reward_head.safetensors":
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_an_old_format_dir_still_loads_and_scores(tmp_path, tiny_bert_dir, tiny_llama_dir, kind):
    """Format 1: the backbone saved as its base model, a Linear head in reward_head.safetensors, read at [CLS]
    (encoders) or at the last real token (causal, EOS appended)."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from toolkit.reward import load_reward_model

    out = tmp_path / "old"
    backbone = AutoModel.from_pretrained(tiny_bert_dir if kind == "bert" else tiny_llama_dir).eval()
    backbone.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir if kind == "bert" else tiny_llama_dir)
    tokenizer.save_pretrained(out)
    torch.manual_seed(1)
    head = {"weight": torch.randn(1, backbone.config.hidden_size), "bias": torch.tensor([0.25])}
    save_file(head, str(out / "reward_head.safetensors"))
    causal = kind == "llama"
    (out / "reward_config.json").write_text(json.dumps({
        "backbone": "x", "max_length": 64, "append_eos": causal, "text_format": "hh", "truncation": "left",
        "objective": "bradley-terry", "lora": False, "read_at": "last" if causal else "first", "format_version": 1,
        "extra": {}}))
    (out / "calibration.json").write_text(json.dumps({
        "method": "temperature", "temperature": 2.0, "reward_mean": 0.5, "reward_std": 1.0, "n_pairs": 10,
        "data": "x", "fingerprint": _old_fingerprint(out)}))

    rm = load_reward_model(str(out))
    expected = []
    for text in rm.texts(PROMPTS, RESPONSES):
        ids = tokenizer(text).input_ids + ([tokenizer.eos_token_id] if causal else [])
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
        expected.append(float(hidden[-1 if causal else 0] @ head["weight"][0] + head["bias"][0]))
    raw = rm.raw_scores(PROMPTS, RESPONSES, batch_size=3)
    assert raw == pytest.approx(expected, abs=1e-5)
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx([(r - 0.5) / 2.0 for r in expected], abs=1e-5)
