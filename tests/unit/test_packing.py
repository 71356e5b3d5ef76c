"""Sequence packing: the packing plan and row layout, padding waste, the packed collate, and the model
giving packed samples exactly the losses they get unpacked (block-diagonal causal attention, no
prediction across a sample boundary), for sdpa, eager and the position-ids (flash) route."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import IMAGE_SIZE, image_transform, jpeg_bytes
from packing_fixtures import build_tiny_lvlm, forward_kwargs, four_samples, span_loss

import lvlm.models.lvlm as lvlm_module
from lvlm.data.collate import collate
from lvlm.data.packing import pack, packed_collate, padding_waste, plan_packing
from lvlm.data.sample import ImageSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.tokenize import IGNORE_INDEX, TokenizedSample
from lvlm.models.lvlm import block_causal_mask, segment_positions



def row_length(samples: list[TokenizedSample]) -> int:
    """A max_length that packs the four fixture samples into rows [s0 s1 s2] and [s3]."""
    return sum(len(s.input_ids) for s in samples[:3]) + 1


def text_sample(key: str, n: int, first: int = 5) -> TokenizedSample:
    ids = list(range(first, first + n))
    return TokenizedSample(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:], images=[], key=key)


# ------------------------------------------------------------------------------ plan and layout


def test_plan_first_fit_in_arrival_order_and_decreasing():
    assert plan_packing([3, 8, 2, 7], 10) == [[0, 2], [1], [3]]
    assert plan_packing([3, 8, 2, 7], 10, order="decreasing") == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match="length 11"):
        plan_packing([3, 11], 10)
    with pytest.raises(ValueError, match="packing order"):
        plan_packing([3], 10, order="best")


@pytest.mark.parametrize("order", ["arrival", "decreasing"])
def test_packing_never_splits_respects_max_length_and_is_deterministic(order):
    rng = random.Random(7)
    samples = [text_sample(f"k{i}", rng.randint(1, 40), first=rng.randint(5, 50)) for i in range(60)]
    for i in range(0, 60, 7):  # some samples carry images
        samples[i].images = [ImageSegment(b"img-%d-%d" % (i, k)) for k in range(1 + i % 3)]
    rows = pack(samples, 48, order)
    assert [r.__dict__ for r in rows] == [r.__dict__ for r in pack(samples, 48, order)]  # deterministic
    assert sorted(i for r in rows for i in r.indices) == list(range(60))  # every sample exactly once
    for row in rows:
        assert len(row) <= 48 and row.indices == sorted(row.indices)
        offset = 0
        for seg, i in enumerate(row.indices):
            s, n = samples[i], len(samples[i].input_ids)
            assert row.input_ids[offset:offset + n] == s.input_ids  # whole sample, contiguous, unmodified
            assert row.labels[offset:offset + n] == [IGNORE_INDEX] + s.labels[1:]
            assert row.position_ids[offset:offset + n] == list(range(n))
            assert row.sequence_ids[offset:offset + n] == [seg] * n
            offset += n
        assert offset == len(row) and row.keys == [samples[i].key for i in row.indices]
        assert row.images == [im for i in row.indices for im in samples[i].images]
    if order == "decreasing":  # FFD never needs more rows than first-fit here
        assert len(rows) <= len(pack(samples, 48, "arrival"))
    with pytest.raises(ValueError, match="max_length=30"):
        pack(samples, 30, order)


def test_segment_positions_and_block_causal_mask_from_sequence_ids():
    seq = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 1, 2, 2, 2, 2, -1]])
    assert segment_positions(seq).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 0, 1, 2, 3, 0]]
    mask = block_causal_mask(seq)[:, 0]
    assert mask.shape == (2, 7, 7) and mask.diagonal(dim1=1, dim2=2).all()  # no fully masked query row
    assert mask[0, 4].tolist() == [False, False, False, True, True, False, False]
    assert mask[0, 6].tolist() == [False] * 5 + [True, True]  # padding sees padding only
    assert not mask[1, 3, :2].any() and mask[1, 5, 2:6].all() and not mask[1, 2, 3:].any()


# ------------------------------------------------------------------------------ padding waste and collate


def test_padding_waste_by_hand():
    assert padding_waste([8, 4], 8) == pytest.approx(4 / 16)
    assert padding_waste([71, 23], 71) == pytest.approx(48 / 142)
    assert padding_waste([], 8) == 0.0
    with pytest.raises(ValueError):
        padding_waste([9], 8)
    samples = [text_sample("a", 5), text_sample("b", 4, first=20), text_sample("c", 3, first=30)]
    batch = packed_collate(samples, image_transform(IMAGE_SIZE), 0, IMAGE_SIZE, max_length=8)
    # first fit: row 0 = a (5) + c (3) = 8, row 1 = b (4) + 4 padding -> 4 of 16 positions wasted
    assert batch["keys"] == ["a", "c", "b"] and batch["num_rows"] == 2 and batch["num_samples"] == 3
    assert batch["padding_waste"] == pytest.approx(0.25)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert batch["input_ids"][1].tolist() == [20, 21, 22, 23, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 6, 7, 8, 9, -100, 31, 32]  # c's first token: not predicted
    assert batch["num_supervised_tokens"] == 4 + 2 + 3
    fixed = packed_collate(samples, image_transform(IMAGE_SIZE), 0, IMAGE_SIZE, max_length=10, pad_to_max_length=True)
    assert fixed["input_ids"].shape == (2, 10) and fixed["padding_waste"] == pytest.approx(8 / 20)


def test_packed_collate_drops_corrupt_samples_and_has_a_dummy():
    good = text_sample("good", 4)
    good.images = [ImageSegment(jpeg_bytes(3))]
    bad = text_sample("bad", 3)
    bad.images = [ImageSegment(b"\xff\xd8\xff\xe0 not a jpeg")]
    skips = SkipCounter()
    batch = packed_collate([bad, good], image_transform(IMAGE_SIZE), 0, IMAGE_SIZE, 16, skips)
    assert skips["corrupt_image"] == 1 and batch["keys"] == ["good"]
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    dummy = packed_collate([bad], image_transform(IMAGE_SIZE), 0, IMAGE_SIZE, 16)
    plain = collate([bad], image_transform(IMAGE_SIZE), 0, IMAGE_SIZE)
    for name in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(dummy[name], plain[name])
    assert dummy["num_samples"] == 0 and dummy["sequence_ids"].tolist() == [[0]]


# ------------------------------------------------------------------------------ model: packed == unpacked


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("packing-assets")


def _per_sample(logits: torch.Tensor, batch: dict, samples: list[TokenizedSample], packed: bool) -> dict:
    """{key: (summed CE, token count, logits span)} read at each sample's own positions."""
    spans = []  # (row, start) in batch["keys"] order
    if packed:
        for r, seq in enumerate(batch["sequence_ids"]):
            spans.extend((r, int((seq == k).nonzero()[0])) for k in range(int(seq.max()) + 1))
    else:
        spans = [(r, 0) for r in range(len(batch["keys"]))]
    by_key = {s.key: s for s in samples}
    out = {}
    for key, (row, start) in zip(batch["keys"], spans, strict=True):
        s = by_key[key]
        span = logits[row, start:start + len(s.input_ids)]
        out[key] = (*span_loss(span, s.labels), span)
    return out


def _run_both(model, transform, samples):
    size = model.vision.image_size
    unpacked = collate(samples, transform, model.llm.pad_token_id, size)
    packed = packed_collate(samples, transform, model.llm.pad_token_id, size, max_length=row_length(samples))
    assert packed["input_ids"].shape[0] == 2 and packed["keys"] == ["s0", "s1", "s2", "s3"]
    with torch.no_grad():
        ref = model(**forward_kwargs(unpacked, packed=False), return_logits=True)
        got = model(**forward_kwargs(packed, packed=True), return_logits=True)
    return unpacked, packed, ref, got


CASES = [("llama", "sdpa", False, False), ("llama", "eager", False, False), ("qwen2", "sdpa", False, False),
         ("llama", "sdpa", True, False), ("llama", "sdpa", True, True)]


@pytest.mark.parametrize("family, attn, position_route, moca", CASES)
def test_packed_losses_equal_unpacked(assets, monkeypatch, family, attn, position_route, moca):
    if position_route:  # the flash route (flatten rows, position_ids only), checked with sdpa on CPU
        monkeypatch.setattr(lvlm_module, "_uses_position_ids_packing", lambda impl: True)
    model, transform = build_tiny_lvlm(assets, family, attn, moca)
    samples = four_samples(model)
    unpacked, packed, ref, got = _run_both(model, transform, samples)
    a = _per_sample(ref.logits, unpacked, samples, packed=False)
    b = _per_sample(got.logits, packed, samples, packed=True)
    for key in a:
        torch.testing.assert_close(b[key][2], a[key][2], atol=1e-5, rtol=1e-5)  # every real position
        torch.testing.assert_close(b[key][0], a[key][0], atol=1e-5, rtol=1e-5)
        assert b[key][1] == a[key][1]
    assert int(got.num_tokens) == int(ref.num_tokens) == packed["num_supervised_tokens"]
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.loss_sum, sum(v[0] for v in b.values()), atol=1e-5, rtol=1e-5)


def test_mutations_cross_sample_attention_and_boundary_labels_are_caught(assets):
    model, transform = build_tiny_lvlm(assets)
    samples = four_samples(model)
    unpacked, packed, ref, got = _run_both(model, transform, samples)
    a = _per_sample(ref.logits, unpacked, samples, packed=False)
    # (1) no block-diagonal mask: plain causal attention over the whole packed row
    kwargs = forward_kwargs(packed, packed=False)
    with torch.no_grad():
        leaky = model(**kwargs, position_ids=packed["position_ids"], return_logits=True)
    c = _per_sample(leaky.logits, packed, samples, packed=True)
    torch.testing.assert_close(c["s0"][0], a["s0"][0], atol=1e-5, rtol=1e-5)  # first in its row: unaffected
    for key in ("s1", "s2"):  # later in the row: they now see the previous samples
        assert not torch.isclose(c[key][0], a[key][0], atol=1e-3)
    assert not torch.isclose(leaky.loss_sum, ref.loss_sum, atol=1e-3)
    # (2) raw concatenated labels (s2's first token is supervised): the model itself must drop the boundary
    raw, start = packed["labels"].clone(), len(samples[0].input_ids) + len(samples[1].input_ids)
    raw[0, start] = samples[2].labels[0]
    assert raw[0, start] != IGNORE_INDEX and packed["sequence_ids"][0, start] == 2
    with torch.no_grad():
        fixed = model(**{**forward_kwargs(packed, packed=True), "labels": raw})
    assert int(fixed.num_tokens) == int(ref.num_tokens)
    torch.testing.assert_close(fixed.loss_sum, ref.loss_sum, atol=1e-5, rtol=1e-5)
    naive = F.cross_entropy(got.logits[:, :-1].reshape(-1, got.logits.shape[-1]), raw[:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")  # what an unmasked shift would give
    assert not torch.isclose(naive, ref.loss_sum, atol=1e-3)


def test_position_route_rejects_samples_not_starting_at_zero(assets, monkeypatch):
    monkeypatch.setattr(lvlm_module, "_uses_position_ids_packing", lambda impl: True)
    model, transform = build_tiny_lvlm(assets)
    samples = four_samples(model)
    packed = packed_collate(samples, transform, model.llm.pad_token_id, model.vision.image_size, row_length(samples))
    kwargs = forward_kwargs(packed, packed=True)
    kwargs["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    with pytest.raises(ValueError, match="start at position 0"):
        model(**kwargs)


def test_hidden_states_and_modality_mask_when_packed(assets):
    model, transform = build_tiny_lvlm(assets)
    samples = four_samples(model)
    packed = packed_collate(samples, transform, model.llm.pad_token_id, model.vision.image_size, row_length(samples))
    with torch.no_grad():
        out = model(**forward_kwargs(packed, packed=True), output_hidden_states=True)
    shape = tuple(packed["input_ids"].shape)
    assert all(tuple(h.shape[:2]) == shape for h in out.hidden_states)
    assert out.modality_mask[packed["sequence_ids"] < 0].eq(-1).all()
    is_image = packed["input_ids"] == model.image_token_id
    assert out.modality_mask[is_image].eq(1).all() and int(is_image.sum()) == 4 * model.tokens_per_image
