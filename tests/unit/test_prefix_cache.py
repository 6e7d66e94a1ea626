"""toolkit/prefix_cache.py: a prefix run once and its suffixes on copies of its KV cache give, at every real suffix
token, what one plain forward of prefix + suffix gives (left-padded prefixes of different lengths, right-padded
suffixes, 3 suffixes per prefix)."""

from __future__ import annotations

import pytest
import torch

from toolkit.prefix_cache import position_ids_from_mask, shared_prefix_forward

pytestmark = pytest.mark.usefixtures("one_thread")


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_suffixes_on_the_shared_cache_see_what_a_plain_forward_sees(tiny_llama):
    model, _ = tiny_llama
    decoder = model.get_decoder()
    prefixes = [[5, 6, 7, 8], [9, 10]]
    suffixes = [[11, 12, 13], [14], [15, 16], [17, 18, 19], [20, 21], [22]]
    repeats = 3
    prefix_ids = torch.tensor([[0] * (4 - len(p)) + p for p in prefixes])
    prefix_mask = torch.tensor([[0] * (4 - len(p)) + [1] * len(p) for p in prefixes])
    suffix_ids = torch.tensor([s + [0] * (3 - len(s)) for s in suffixes])
    suffix_mask = torch.tensor([[1] * len(s) + [0] * (3 - len(s)) for s in suffixes])
    with torch.no_grad():
        _, out = shared_prefix_forward(decoder, prefix_ids, prefix_mask, suffix_ids, suffix_mask, repeats)
        for row, suffix in enumerate(suffixes):
            plain = decoder(input_ids=torch.tensor([prefixes[row // repeats] + suffix])).last_hidden_state[0]
            torch.testing.assert_close(out.last_hidden_state[row, :len(suffix)], plain[-len(suffix):],
                                       atol=1e-5, rtol=1e-4)
