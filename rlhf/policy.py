"""Actor, critic and reference.

- Actor: the causal LM (optionally a peft LoRA model). One trunk forward gives the hidden states of
  the response positions; the LM head turns them into temperature-scaled logits one answer at a time,
  which give the answer's log-probs (and entropy) and are freed (`response_logprobs`).
- Critic: a scalar value head on the same hidden states (default), or a separate model whose
  backbone and score head come from the reward model (`--critic reward`) or any directory. GRPO and
  RLOO have neither (`value_head=False`): no value parameters, values None.
- Reference: the actor with its LoRA adapter disabled (no second copy of the weights), or a frozen
  copy of the starting weights when every weight trains.

Position `context_length - 1 + t` predicts response token t, so logits and values are read from
`hidden[:, context_length - 1 : -1]`: V_t is the value of the state before response token t.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from toolkit.errors import UserError
from toolkit.head_logprobs import FrozenHeadLogprobs, frozen_plain_linear, logprobs_of
from toolkit.prefix_cache import position_ids_from_mask, shared_prefix_forward
from toolkit.training.model import causal_lm, disable_dropout


def response_hidden(lm: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                    context_length: int, group_size: int = 1) -> torch.Tensor:
    """Last hidden states at the positions that predict the response tokens: [B, R, H]. `group_size` K > 1:
    rows iK … iK + K − 1 answer one prompt (same left-padded query), which then runs once (`_grouped_hidden`)."""
    decoder = causal_lm(lm).get_decoder()
    if group_size > 1:
        return _grouped_hidden(decoder, query_responses, attention_mask, context_length, group_size)
    out = decoder(input_ids=query_responses, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state[:, context_length - 1:-1]


def _grouped_hidden(decoder: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                    context_length: int, group_size: int) -> torch.Tensor:
    # Each group's prompt runs once, its K answers on its cache (toolkit.prefix_cache). The prompt's last position
    # predicts response token 0; response tokens 0 … R − 2 predict the rest.
    prompt_ids = query_responses[::group_size, :context_length]
    prompt_mask = attention_mask[::group_size, :context_length]
    if query_responses.shape[1] - context_length < 2:
        prompts = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                          position_ids=position_ids_from_mask(prompt_mask), use_cache=False)
        return prompts.last_hidden_state[:, -1:].repeat_interleave(group_size, dim=0)
    prompts, answers = shared_prefix_forward(decoder, prompt_ids, prompt_mask, query_responses[:, context_length:-1],
                                             attention_mask[:, context_length:-1], group_size)
    first = prompts.last_hidden_state[:, -1:].repeat_interleave(group_size, dim=0)
    return torch.cat([first, answers.last_hidden_state], dim=1)


def response_logits(lm: nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled logits, exactly as the sampler scales them, in float32: [..., V]. Scaled in place: the
    head's output is not saved for backward."""
    return causal_lm(lm).get_output_embeddings()(hidden).float().div_(temperature)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of π at each position ([..., V] -> [...])."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_logprobs(lm: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                      entropy: str = "none", recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log π(tokens) [B, R], entropy [B, R] or None) from the response positions' hidden states, one answer at a
    time: an answer's [R, V] logits are formed, used and freed, so the softmax temporaries are one answer's. With
    autograd on, a frozen head (LoRA) gives the gradient from what forward kept (`FrozenHeadLogprobs`): no
    [B, R, V] tensor exists, which with a 49k vocabulary was an update's largest, twice over with its gradient. A
    head that trains keeps its logits for backward, or with `recompute` (--gradient-checkpointing) recomputes each
    answer's there (a checkpoint: less memory, one more head product). `entropy`: "none", "stat" (a statistic, no
    gradient) or "loss" (differentiable, for an entropy bonus)."""
    if entropy not in ("none", "stat", "loss"):
        raise ValueError(f"entropy must be none, stat or loss, not {entropy!r}")
    head = causal_lm(lm).get_output_embeddings()

    def from_logits(logits: torch.Tensor, answer_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logprobs = logprobs_of(logits, answer_tokens)
        if entropy == "none":
            return (logprobs,)
        with contextlib.nullcontext() if entropy == "loss" else torch.no_grad():
            return logprobs, entropy_of(logits)

    def one_answer(answer_hidden: torch.Tensor, answer_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return from_logits(response_logits(lm, answer_hidden, temperature), answer_tokens)

    def per_answer(batch: torch.Tensor) -> zip:
        return zip(batch.split(1), tokens.split(1), strict=True)

    grad = torch.is_grad_enabled() and hidden.requires_grad
    if grad and entropy != "loss" and frozen_plain_linear(head):
        answers = [FrozenHeadLogprobs.apply(h, head.weight, t, temperature) for h, t in per_answer(hidden)]
    elif grad and recompute:
        answers = [checkpoint(one_answer, h, t, use_reentrant=False) for h, t in per_answer(hidden)]
    elif grad:  # kept for backward anyway: one head product for the batch (tiny PPO, all weights: 1.40 s/step, not 1.8)
        answers = [from_logits(logits, t) for logits, t in per_answer(response_logits(lm, hidden, temperature))]
    else:
        answers = [one_answer(h, t) for h, t in per_answer(hidden)]
    logprobs = torch.cat([a[0] for a in answers])
    return logprobs, (torch.cat([a[1] for a in answers]) if entropy != "none" else None)


class Critic(nn.Module):
    """A separate value model: a transformer backbone and a linear head on every position."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        params = inspect.signature(backbone.forward).parameters
        self._positions = "position_ids" in params

    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                context_length: int) -> torch.Tensor:
        kwargs = {"position_ids": position_ids_from_mask(attention_mask)} if self._positions else {}
        hidden = self.backbone(input_ids=query_responses, attention_mask=attention_mask, use_cache=False,
                               **kwargs).last_hidden_state
        return self.head(hidden[:, context_length - 1:-1]).squeeze(-1).float()


class ActorCritic(nn.Module):
    """Everything that trains, in one module (one optimizer, one DDP wrapper)."""

    def __init__(self, lm: nn.Module, critic: Critic | None = None, value_head: bool = True,
                 recompute_logits: bool = False):
        super().__init__()
        self.lm = lm
        self.recompute_logits = recompute_logits  # as `response_logprobs`' recompute
        self.critic = critic
        self.v_head = None
        if critic is None and value_head:
            self.v_head = nn.Linear(causal_lm(lm).config.hidden_size, 1)
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)

    @property
    def has_values(self) -> bool:
        """Is there a value model (head or critic)? Not for GRPO / RLOO."""
        return self.v_head is not None or self.critic is not None

    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                temperature: float, responses: torch.Tensor, group_size: int = 1,
                entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(log π(responses) [B, R], entropy [B, R] or None, values [B, R] or None without a value model) at the
        response positions; `group_size` as `response_hidden`, `entropy` as `response_logprobs` (one forward, so
        DDP's hooks see both passes)."""
        hidden = response_hidden(self.lm, query_responses, attention_mask, context_length, group_size)
        logprobs, entropy_values = response_logprobs(self.lm, hidden, responses, temperature, entropy,
                                                     self.recompute_logits)
        if self.v_head is not None:
            values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
        elif self.critic is not None:
            values = self.critic(query_responses, attention_mask, context_length)
        else:
            values = None
        return logprobs, entropy_values, values

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.v_head if self.v_head is not None else self.critic
        return {k: v.detach().contiguous() for k, v in module.state_dict().items()}

    def load_value_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        module = self.v_head if self.v_head is not None else self.critic
        module.load_state_dict(state)


class Reference:
    """π_ref: the LoRA adapter switched off, or a frozen model (a copy of the starting weights, or --reference's
    model). `gathered(module)`: the context in which a partitioned frozen model (DeepSpeed ZeRO-3, outside any
    engine) has its whole weights."""

    def __init__(self, actor: ActorCritic, frozen_lm: nn.Module | None,
                 gathered: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None):
        self.actor, self.frozen_lm = actor, frozen_lm
        self.gathered = gathered or (lambda _module: contextlib.nullcontext())
        if frozen_lm is None and not hasattr(actor.lm, "disable_adapter"):
            raise ValueError("a reference needs a frozen copy unless the actor is a LoRA (peft) model")

    @torch.no_grad()
    def logprobs(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                 temperature: float, responses: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        lm = self.frozen_lm if self.frozen_lm is not None else self.actor.lm
        ctx = self.actor.lm.disable_adapter() if self.frozen_lm is None else self.gathered(lm)
        with ctx:
            hidden = response_hidden(lm, query_responses, attention_mask, context_length, group_size)
            return response_logprobs(lm, hidden, responses, temperature)[0]


def frozen_copy(lm: nn.Module) -> nn.Module:
    return frozen(copy.deepcopy(lm))


def frozen(lm: nn.Module) -> nn.Module:
    lm.requires_grad_(False)
    return lm.eval()


def load_critic(spec: str, reward: str, policy_tokenizer) -> Critic:
    """A separate critic from the reward model's directory (`reward`) or any model directory."""
    from transformers import AutoModelForSequenceClassification

    from toolkit.models import check_weights, load_errors, load_tokenizer, one_line, resolve

    source = reward if spec == "reward" else spec
    if spec == "reward" and source.startswith("rules"):
        raise UserError("--critic reward needs --reward to be a reward-model directory, not rules")
    path = resolve(source)
    backbone_dir = path / "model" if (path / "model" / "config.json").is_file() else path
    tokenizer = load_tokenizer(backbone_dir)
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise UserError(f"--critic {spec}: '{backbone_dir}' uses a different tokenizer from the policy; a "
                        "critic reads the policy's tokens, so use --critic value-head (the default)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone_dir, num_labels=1, dtype=torch.float32, trust_remote_code=False,
            use_safetensors=check_weights(backbone_dir))
    except load_errors() as err:  # a truncated safetensors file too
        raise UserError(f"--critic {spec}: cannot load '{backbone_dir}': {one_line(err)}") from None
    backbone = getattr(model, model.base_model_prefix)
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise UserError(f"--critic {spec}: cannot find the score head of '{backbone_dir}'")
    critic = Critic(backbone, head)
    disable_dropout(critic)
    return critic.eval()
