"""DPO maths against hand-computed values: the sigmoid / label-smoothed / IPO losses and TRL's metrics, answer-only
sequence log-probs, the one concatenated forward, the LoRA reference, and the first step's loss of log 2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support.cli import FIXTURES

from toolkit.dpo import (
    IGNORE,
    DPOConfig,
    PairTokens,
    chosen_nll,
    collate,
    concatenated_logps,
    dpo_loss,
    encode_answer,
    prompt_messages,
    sequence_logps,
    tokenize_pairs,
    train_dpo,
)
from toolkit.errors import UserError
from toolkit.rows import Pair

T = torch.tensor


def _loss(beta: float, loss_type: str = "sigmoid", eps: float = 0.0) -> dict[str, torch.Tensor]:
    # log π(c) = -1, log π(r) = -3, log π_ref = -2 for both: the policy's log-ratio is 2, the reference's 0
    return dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta, loss_type, eps)


def test_sigmoid_loss_and_trl_metrics_by_hand():
    out = _loss(0.5)  # logits = 0.5 · (2 − 0) = 1
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-1)))  # −log σ(1) = 0.3133
    assert out["rewards/chosen"].item() == pytest.approx(0.5)  # 0.5 · (−1 − (−2))
    assert out["rewards/rejected"].item() == pytest.approx(-0.5)  # 0.5 · (−3 − (−2))
    assert out["rewards/margins"].item() == pytest.approx(1.0)
    assert out["rewards/accuracies"].item() == 1.0
    assert out["logps/chosen"].item() == -1.0 and out["logps/rejected"].item() == -3.0


def test_label_smoothing_by_hand():
    out = _loss(0.5, eps=0.2)  # 0.8 · −log σ(1) + 0.2 · −log σ(−1)
    assert out["loss"].item() == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.e))
    assert out["loss"].item() == pytest.approx(0.51326, abs=1e-5)


@pytest.mark.parametrize(("beta", "expected"), [(0.5, 1.0), (0.1, 9.0)])
def test_ipo_loss_by_hand(beta, expected):
    # (log-ratio difference − 1/(2β))²: (2 − 1)² with β 0.5, (2 − 5)² with β 0.1
    assert _loss(beta, "ipo")["loss"].item() == pytest.approx(expected)


def test_policy_equal_to_reference_gives_log_2():
    out = dpo_loss(T([-4.0, -7.0]), T([-5.0, -2.0]), T([-4.0, -7.0]), T([-5.0, -2.0]), 0.1)
    assert out["loss"].tolist() == pytest.approx([math.log(2)] * 2)
    assert out["rewards/accuracies"].tolist() == [0.0, 0.0]  # a tie is not a win (TRL's `>`)
    with pytest.raises(UserError, match="unknown --loss"):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), 0.1, "hinge")


def test_rpo_adds_alpha_times_the_chosen_nll_per_token_in_either_batch_layout():
    from toolkit.dpo import shared_prompt_batch

    pairs = [PairTokens([1, 2, 3, 4, 5], 2, [1, 2, 6], 2), PairTokens([7, 8, 9], 2, [7, 8, 4, 4], 2)]
    plain = collate(pairs, pad_id=0)
    shared = shared_prompt_batch(pairs, pad_id=0, min_saving=None)
    chosen = T([-6.0, -2.0])  # 3 and 1 chosen answer tokens
    for batch in (plain, shared):
        assert chosen_nll(chosen, batch).tolist() == pytest.approx([2.0, 2.0])
    assert chosen_nll(T([-0.5]), plain, average=True).tolist() == [0.5]  # IPO's log-probs are already means
    base = _loss(0.5)
    nll = T([1.5])
    out = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), 0.5, nll=nll, rpo_alpha=2.0)
    assert out["loss"].item() == pytest.approx(base["loss"].item() + 3.0)
    assert out["nll_loss"].item() == 1.5 and out["rewards/margins"].item() == base["rewards/margins"].item()
    assert dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), 0.5, nll=nll)["loss"].item() == \
        pytest.approx(base["loss"].item())  # logged, not trained on, without --rpo-alpha


def test_sequence_logps_sum_only_the_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    input_ids = torch.randint(0, 11, (2, 6))
    labels = torch.full((2, 6), IGNORE)
    labels[0, 2:5] = input_ids[0, 2:5]  # prompt 0..1, answer 2..4, padding 5
    labels[1, 3:6] = input_ids[1, 3:6]
    token_logps = torch.log_softmax(logits, -1)
    expected = [sum(token_logps[0, t - 1, input_ids[0, t]] for t in range(2, 5)),
                sum(token_logps[1, t - 1, input_ids[1, t]] for t in range(3, 6))]
    assert sequence_logps(logits, labels).tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)
    assert sequence_logps(logits, labels, average=True).tolist() == pytest.approx(
        [float(e) / 3 for e in expected], abs=1e-5)
    changed = logits.clone()
    changed[0, :1] += 5.0  # predicts the prompt's second token: not an answer token
    changed[0, 5] += 5.0  # the last position predicts nothing
    assert sequence_logps(changed, labels).tolist() == pytest.approx(sequence_logps(logits, labels).tolist())


def test_collate_puts_chosen_then_rejected_and_masks_prompt_and_padding():
    batch = collate([PairTokens([1, 2, 3, 4], 2, [1, 2, 5], 2), PairTokens([6, 7], 1, [6, 8, 9, 9, 9], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0], [6, 7, 0, 0, 0], [1, 2, 5, 0, 0], [6, 8, 9, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE],
                                        [IGNORE, IGNORE, 5, IGNORE, IGNORE], [IGNORE, 8, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 5]


def _pairs(n: int) -> list[Pair]:
    from toolkit.reward.data import load_preferences

    return load_preferences(FIXTURES / "hh-harmless-6.jsonl").pairs[:n]


def test_answers_follow_the_chat_template_and_end_with_eos(tiny_llama):
    _, tokenizer = tiny_llama
    messages = prompt_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert prompt_messages("plain prompt") == [{"role": "user", "content": "plain prompt"}]
    prompt, answer = encode_answer(tokenizer, messages, "fine, thanks", {tokenizer.eos_token_id})
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(answer) == "fine, thanks<|im_end|>" and answer.count(tokenizer.eos_token_id) == 1


def test_truncation_keeps_the_prompt_end_and_cuts_the_answer_end(tiny_llama):
    _, tokenizer = tiny_llama
    pairs = _pairs(3)
    full, stats = tokenize_pairs(pairs, tokenizer, 10_000, 5_000)
    assert stats == {"pairs": 3, "truncated_prompts": 0, "truncated_answers": 0}
    cut, stats = tokenize_pairs(pairs, tokenizer, 24, 16)
    assert stats == {"pairs": 3, "truncated_prompts": 3, "truncated_answers": 3}
    for a, b in zip(full, cut, strict=True):
        assert b.chosen_start == 16 and len(b.chosen) <= 24
        assert b.chosen[:16] == a.chosen[a.chosen_start - 16:a.chosen_start]  # the prompt's last tokens
        assert b.chosen[16:] == a.chosen[a.chosen_start:a.chosen_start + len(b.chosen) - 16]  # the answer's start


def test_one_concatenated_forward_equals_separate_forwards(tiny_llama):
    model, tokenizer = tiny_llama
    tokens, _ = tokenize_pairs(_pairs(3), tokenizer, 96, 48)
    with torch.no_grad():
        chosen, rejected = concatenated_logps(model, collate(tokens, tokenizer.pad_token_id))
        for i, pair in enumerate(tokens):
            for ids, start, got in ((pair.chosen, pair.chosen_start, chosen[i]),
                                    (pair.rejected, pair.rejected_start, rejected[i])):
                labels = torch.tensor([[IGNORE] * start + ids[start:]])
                alone = sequence_logps(model(input_ids=torch.tensor([ids])).logits, labels)
                assert got.item() == pytest.approx(alone.item(), abs=1e-4)


def test_lora_reference_is_the_base_model_with_the_adapter_off(tiny_llama):
    from toolkit.training.model import add_lora

    model, tokenizer = tiny_llama
    batch = collate(tokenize_pairs(_pairs(2), tokenizer, 64, 32)[0], tokenizer.pad_token_id)
    peft_model = add_lora(copy.deepcopy(model), 4, 8, task_type="CAUSAL_LM")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter: the policy now differs from the base
        base = torch.cat(concatenated_logps(model, batch))
        policy = torch.cat(concatenated_logps(peft_model, batch))
        with peft_model.disable_adapter():
            reference = torch.cat(concatenated_logps(peft_model, batch))
    assert reference.tolist() == pytest.approx(base.tolist(), abs=1e-5)
    assert not torch.allclose(policy, base, atol=1e-3)


@pytest.mark.parametrize(("loss", "rpo_alpha"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_first_lora_step_has_the_loss_of_a_policy_equal_to_its_reference(tiny_llama_dir, tmp_path, loss, rpo_alpha):
    result = train_dpo(DPOConfig(data=str(FIXTURES / "hh-harmless-6.jsonl"), policy=str(tiny_llama_dir),
                                 out=str(tmp_path / "run"), lora=True, lora_r=4, loss=loss, max_steps=1,
                                 batch_size=3, max_length=48, max_prompt_length=24, learning_rate=1e-3,
                                 rpo_alpha=rpo_alpha))
    first = result.history[0]
    beta = 0.1
    expected = math.log(2) if loss == "sigmoid" else (1 / (2 * beta)) ** 2  # logits 0: log 2, or (0 − 5)²
    # per token: the answers' sums are larger, IPO's log-probs are means already
    assert first["nll_loss"] == pytest.approx(-first["logps/chosen"]) if loss == "ipo" else \
        0 < first["nll_loss"] < -first["logps/chosen"]
    assert first["loss"] == pytest.approx(expected + rpo_alpha * first["nll_loss"], rel=1e-5)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
