"""`--precompute-ref` computes the reference log-probs of the pairs the run's steps will read, no more: a run
shorter than an epoch leaves the others out (NaN in the table its checkpoint carries), and trains exactly as the
reference forward at every step would."""

from __future__ import annotations

import itertools
import random

import pytest
from safetensors.torch import load_file
from support.cli import FIXTURES

from toolkit.dpo import PAIR_METRICS, DPOConfig, train_dpo
from toolkit.training.batches import epoch_batches, examples_read, step_micro_batches


@pytest.mark.parametrize(("n", "batch_size", "accumulation", "world_size"),
                         [(13, 2, 1, 1), (13, 2, 2, 1), (20, 3, 1, 2), (9, 4, 2, 2), (5, 8, 1, 1)])
def test_examples_read_is_the_union_of_every_process_s_micro_batches(n, batch_size, accumulation, world_size):
    steps_per_epoch = max(1, -(-n // batch_size) // (accumulation * world_size))
    for start, stop in itertools.product(range(0, 2 * steps_per_epoch + 1), repeat=2):
        expected = {i for step, rank in itertools.product(range(start, stop), range(world_size))
                    for micro in step_micro_batches(n, step=step, steps_per_epoch=steps_per_epoch,
                                                    batch_size=batch_size, accumulation=accumulation, rank=rank,
                                                    world_size=world_size, seed=3)
                    for i in micro}
        assert examples_read(n, start=start, stop=stop, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                             accumulation=accumulation, world_size=world_size, seed=3) == sorted(expected)


def test_a_run_over_a_whole_epoch_reads_every_example():
    n = 101
    assert examples_read(n, start=0, stop=random.Random(0).randint(13, 40), steps_per_epoch=13, batch_size=8,
                         accumulation=1, world_size=1, seed=0) == list(range(n))


def test_a_run_shorter_than_an_epoch_precomputes_only_the_pairs_it_reads(tiny_llama_dir, tmp_path):
    data = str(FIXTURES / "hh-harmless-6.jsonl")
    runs = {}
    for precompute in (True, False):
        cfg = DPOConfig(data=data, policy=str(tiny_llama_dir), out=str(tmp_path / str(precompute)), lora=True,
                        lora_r=4, max_steps=2, batch_size=2, max_length=48, max_prompt_length=24,
                        learning_rate=1e-2, seed=5, precompute_ref=precompute)
        runs[precompute] = train_dpo(cfg)
    table = load_file(tmp_path / "True" / "checkpoints" / "step-000002" / "reference.safetensors")["train"]
    first, second = epoch_batches(6, 2, epoch=0, seed=5)[:2]  # the two steps' batches (3 steps to an epoch)
    read = sorted(first + second)
    assert table.shape == (6, 2)
    assert [i for i in range(6) if bool(table[i].isfinite().all())] == read  # 4 of the 6
    assert bool(table[[i for i in range(6) if i not in read]].isnan().all())
    for got, want in zip(runs[True].history, runs[False].history, strict=True):
        for key in (*PAIR_METRICS, "grad_norm"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), (got["step"], key)
