"""Length-grouped stage-2 batching: every sample once per epoch, homogeneous batches, deterministic, multi-rank."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from torch.utils.data import DistributedSampler, RandomSampler

from datamodules.instructions import InstructionData
from datamodules.length_grouped import LengthGroupedSampler, padding_waste


class CharTok:
    """Char-level tokenizer: BOS=1, EOS=2, char -> 3 + byte."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [3 + b for b in text.encode("utf-8")] + [2] * eos

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.lognormvariate(4.5, 0.8)) + 5 for _ in range(n)]


def rank_batches(sampler: LengthGroupedSampler) -> list[list[int]]:
    order = list(sampler)
    return [order[i:i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


@pytest.mark.parametrize("n", [480, 487])
def test_every_sample_once_per_epoch_over_all_ranks(n):
    lens, world, batch = lengths(n), 3, 4
    seen = Counter()
    for rank in range(world):
        sampler = LengthGroupedSampler(lens, batch, world, rank, seed=5, group_size=4)
        sampler.set_epoch(2)
        order = list(sampler)
        assert len(order) == len(sampler) and len(order) % batch == 0
        seen.update(order)
    assert set(seen) == set(range(n))
    extra = sum(seen.values()) - n
    assert extra == (-n) % (world * batch) and (extra > 0 or all(c == 1 for c in seen.values()))


def test_steps_are_length_homogeneous_across_ranks():
    lens, world, batch = lengths(960, seed=1), 2, 4
    per_rank = [rank_batches(LengthGroupedSampler(lens, batch, world, r, seed=0)) for r in range(world)]
    steps = [[i for rank in per_rank for i in rank[step]] for step in range(len(per_rank[0]))]
    assert all(len(set(s)) == world * batch for s in steps)  # ranks never share a sample in one step
    grouped = padding_waste([[lens[i] for i in s] for s in steps])
    rng = random.Random(0)
    shuffled = list(range(len(lens)))
    rng.shuffle(shuffled)
    plain = padding_waste([[lens[i] for i in shuffled[k:k + world * batch]] for k in range(0, len(lens), world * batch)])
    assert grouped < plain / 3
    assert max(lens) in [lens[i] for i in steps[0]]  # the longest step comes first
    # one megabatch spanning the epoch: every step is a run of neighbours in the sorted lengths
    whole = [rank_batches(LengthGroupedSampler(lens, batch, world, r, seed=0, group_size=10**6)) for r in range(world)]
    for step in range(len(whole[0])):
        step_lens = [lens[i] for rank in whole for i in rank[step]]
        assert not any(min(step_lens) < x < max(step_lens) for x in lens if x not in step_lens)
    assert padding_waste([[3, 3], [5]]) == 0.0 and padding_waste([[1, 3]]) == pytest.approx(1 / 3)


def test_order_is_deterministic_per_seed_and_epoch():
    lens = lengths(200)

    def order(seed: int, epoch: int) -> list[int]:
        sampler = LengthGroupedSampler(lens, 4, 2, 1, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)


def test_instruction_module_groups_by_length_only_when_asked(tmp_path):
    rng = random.Random(0)
    items = [{"instruction": f"question {i}", "input": "", "output": "x" * rng.randint(1, 200)} for i in range(24)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(items))
    common = dict(train_files=str(path), tokenizer=CharTok(), batch_size=4, num_workers=0, image_size=8,
                  text_only_injection=False)
    plain = InstructionData(**common).train_dataloader()
    assert isinstance(plain.sampler, RandomSampler)
    dm = InstructionData(**common, group_by_length=True, length_group_size=2, seed=7)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps a DistributedSampler as it is
    batches = list(loader)
    texts = [t for b in batches for t in b["text"]]
    assert sorted(texts) == sorted(item["instruction"] for item in items)  # each sample once
    real = [int((b["tokens"] != 0).sum()) for b in batches]
    waste = 1 - sum(real) / sum(b["tokens"].numel() for b in batches)
    plain_batches = list(plain)
    plain_waste = 1 - sum(int((b["tokens"] != 0).sum()) for b in plain_batches) / sum(b["tokens"].numel() for b in plain_batches)
    assert waste < plain_waste
    assert [b["text"] for b in loader] == [b["text"] for b in batches]  # same seed and epoch, same order
