"""LLM wrapper (two families, loaded by path), connectors, and the LVLM composition: image features
spliced at placeholder positions, loss on supervised tokens only, hidden states + modality mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import WORDS, save_llm
from vision_fixtures import save_hf

from lvlm.config.schema import HFVisionConfig, LinearConnectorConfig, LLMConfig, MLPConnectorConfig, ModelConfig
from lvlm.models.build import build_lvlm
from lvlm.models.connectors import build_connector
from lvlm.models.llm import build_llm


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llm("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory, llama_dir):
    vdir = tmp_path_factory.mktemp("clip")
    save_hf("clip_vision", vdir)
    cfg = ModelConfig(vision=HFVisionConfig(name_or_path=str(vdir)), llm=LLMConfig(name_or_path=str(llama_dir)))
    model, transform, tokenizer = build_lvlm(cfg)
    return model.eval()


@pytest.mark.parametrize("family, has_bos, layer", [("llama", True, "LlamaDecoderLayer"),
                                                    ("qwen2", False, "Qwen2DecoderLayer")])
def test_llm_families_load_by_path(tmp_path, family, has_bos, layer):
    path = save_llm(family, tmp_path / family)
    before = len(__import__("transformers").AutoTokenizer.from_pretrained(path))
    lm = build_llm(LLMConfig(name_or_path=str(path)))
    assert lm.model_type == family and lm.layer_cls.__name__ == layer and lm.num_layers == 2
    assert lm.image_token_id == before  # appended to the vocabulary ...
    assert lm.model.get_input_embeddings().num_embeddings >= before + 1  # ... and the embeddings grew
    assert (lm.bos_token_id is not None) == has_bos  # quirk table by model_type: Qwen2 has no BOS
    assert lm.pad_token_id is not None
    random = build_llm(LLMConfig(name_or_path=str(path), random_init=True))
    assert not torch.equal(random.model.lm_head.weight[:before], lm.model.lm_head.weight[:before])


def test_image_token_must_not_be_a_word_of_the_vocabulary(tmp_path):
    """An ordinary vocabulary token as the placeholder would turn every occurrence of that word in the training
    text into an image slot (the tokenizer strips the image id from text): refused; an added token is fine."""
    path = save_llm("llama", tmp_path / "llama")
    word = WORDS[0]
    with pytest.raises(ValueError, match=f"model.llm.image_token '{word}' is an ordinary token"):
        build_llm(LLMConfig(name_or_path=str(path), image_token=word))
    first = build_llm(LLMConfig(name_or_path=str(path)))                  # <image> added as a special token
    first.tokenizer.save_pretrained(path)
    assert build_llm(LLMConfig(name_or_path=str(path))).image_token_id == first.image_token_id  # reused, no error


def test_llm_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.llm.name_or_path"):
        build_llm(LLMConfig(name_or_path=str(tmp_path / "nope")))


@pytest.mark.parametrize("cfg, n_linear", [(LinearConnectorConfig(), 1), (MLPConnectorConfig(depth=2), 2),
                                           (MLPConnectorConfig(depth=4, activation="silu"), 4)])
def test_connectors_map_dims_and_keep_tokens(cfg, n_linear):
    conn = build_connector(cfg, in_dim=12, out_dim=20)
    x = torch.randn(3, 7, 12, requires_grad=True)
    y = conn(x)
    assert y.shape == (3, 7, 20) and conn.num_tokens(7) == 7
    assert sum(isinstance(m, torch.nn.Linear) for m in conn.modules()) == n_linear
    y.sum().backward()
    assert all(p.grad is not None for p in conn.parameters())


def _batch(model, n_text=5, images=1, pad=2):
    t = model.tokens_per_image
    ids = [model.llm.bos_token_id] + [model.image_token_id] * t * images + list(range(5, 5 + n_text))
    ids = torch.tensor([ids + [model.llm.pad_token_id] * pad])
    attn = torch.ones_like(ids)
    attn[:, ids.shape[1] - pad:] = 0
    labels = ids.clone()
    labels[(ids == model.image_token_id) | (attn == 0)] = -100
    labels[:, 0] = -100
    pixels = torch.randn(images, 3, model.vision.image_size, model.vision.image_size)
    return ids, attn, labels, pixels


def test_image_features_are_spliced_at_placeholders(lvlm):
    ids, attn, labels, pixels = _batch(lvlm)
    with torch.no_grad():
        out = lvlm(ids, attn, labels, pixels, output_hidden_states=True)
        feats = lvlm.encode_images(pixels)  # [1, T, D]
    embeds = out.hidden_states[0]  # the LLM's input embeddings
    is_image = ids == lvlm.image_token_id
    torch.testing.assert_close(embeds[is_image], feats.reshape(-1, feats.shape[-1]))
    torch.testing.assert_close(embeds[~is_image], lvlm.llm.embed(ids)[~is_image])
    assert out.modality_mask[is_image].eq(1).all() and out.modality_mask[attn == 0].eq(-1).all()
    assert out.modality_mask[(~is_image) & (attn == 1)].eq(0).all()
    assert len(out.hidden_states) == lvlm.llm.num_layers + 1


def test_loss_is_sum_over_supervised_tokens_only(lvlm):
    ids, attn, labels, pixels = _batch(lvlm)
    with torch.no_grad():
        out = lvlm(ids, attn, labels, pixels, return_logits=True)
    logits, target = out.logits[0, :-1], labels[0, 1:]
    keep = target != -100
    expected = F.cross_entropy(logits[keep], target[keep], reduction="sum")
    assert int(out.num_tokens) == int(keep.sum()) == 5  # the text only: no image, prompt or pad positions
    torch.testing.assert_close(out.loss_sum, expected)
    torch.testing.assert_close(out.loss, expected / 5)


def test_image_content_changes_text_loss(lvlm):
    ids, attn, labels, pixels = _batch(lvlm)
    with torch.no_grad():
        a = lvlm(ids, attn, labels, pixels).loss_sum
        b = lvlm(ids, attn, labels, torch.randn_like(pixels)).loss_sum
    assert not torch.isclose(a, b)


def test_placeholder_image_count_mismatch_is_an_error(lvlm):
    ids, attn, labels, pixels = _batch(lvlm, images=2)
    with pytest.raises(ValueError, match="image placeholder tokens"):
        lvlm(ids, attn, labels, pixels[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        lvlm(ids, attn, labels, None)


def test_text_only_batch_still_runs_vision_path_with_zero_weight(lvlm):
    ids, attn, labels, _ = _batch(lvlm, images=0)
    out = lvlm(ids, attn, labels, None)
    out.loss_sum.backward()
    grads = [p.grad for p in lvlm.connector.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)  # reached, but contributes nothing
    lvlm.zero_grad(set_to_none=True)
    with torch.no_grad():
        plain = lvlm.llm(lvlm.llm.embed(ids), attention_mask=attn).logits
        spliced = lvlm(ids, attn, labels, None, return_logits=True).logits
    torch.testing.assert_close(plain, spliced)


def test_stage_freezes_parts_and_gradient_check_catches_violations(lvlm):
    from lvlm.config.schema import StageConfig
    from lvlm.train import stages

    plan = stages.apply_stage(lvlm, StageConfig())
    assert plan == {"vision": False, "connector": True, "llm": False}
    assert not any(p.requires_grad for p in lvlm.vision.parameters())
    assert not any(p.requires_grad for p in lvlm.llm.parameters())
    assert all(p.requires_grad for p in lvlm.connector.parameters())
    table = stages.parameter_table(lvlm)
    n_conn = sum(p.numel() for p in lvlm.connector.parameters())
    assert f"{n_conn:,}" in table.splitlines()[2] and table.splitlines()[1].split()[2] == "0"

    ids, attn, labels, pixels = _batch(lvlm)
    lvlm.zero_grad(set_to_none=True)
    lvlm(ids, attn, labels, pixels).loss_sum.backward()
    grad = lambda p: p.grad  # noqa: E731  (the single-process stand-in for DeepSpeed's full-grad getter)
    stages.check_gradients(lvlm, plan, grad)  # a correct stage passes
    with pytest.raises(RuntimeError, match="trains 'vision' but none of its parameters is trainable"):
        stages.check_gradients(lvlm, {**plan, "vision": True}, grad)
    with pytest.raises(RuntimeError, match="trains 'connector' but it received no gradient"):
        stages.check_gradients(lvlm, plan, lambda p: None)
    lvlm.llm.model.lm_head.weight.grad = torch.ones_like(lvlm.llm.model.lm_head.weight)
    with pytest.raises(RuntimeError, match="freezes 'llm'"):
        stages.check_gradients(lvlm, plan, grad)
    lvlm.zero_grad(set_to_none=True)
    for p in lvlm.parameters():
        p.requires_grad_(True)


def test_moca_trains_and_changes_only_image_positions(tmp_path_factory, llama_dir):
    vdir = tmp_path_factory.mktemp("clip_moca")
    save_hf("clip_vision", vdir)
    cfg = ModelConfig(vision=HFVisionConfig(name_or_path=str(vdir)), llm=LLMConfig(name_or_path=str(llama_dir)),
                      moca=True)
    torch.manual_seed(0)
    model, _, _ = build_lvlm(cfg)
    model.eval()
    assert len(model.moca.layers) == model.llm.num_layers
    ids, attn, labels, pixels = _batch(model)
    is_image = ids == model.image_token_id
    with torch.no_grad():
        base = model(ids, attn, labels, pixels, output_hidden_states=True)
    out = model(ids, attn, labels, pixels, output_hidden_states=True)  # identity at init: same output
    torch.testing.assert_close(out.hidden_states[1], base.hidden_states[1])
    out.loss_sum.backward()  # MoCa parameters receive gradients
    for cal in model.moca.layers:
        assert cal.scale.grad is not None and torch.count_nonzero(cal.shift.grad) > 0
    with torch.no_grad():
        model.moca.layers[0].shift.add_(0.5)
        moved = model(ids, attn, labels, pixels, output_hidden_states=True)
    h0, h1 = base.hidden_states[1], moved.hidden_states[1]  # output of decoder layer 1 (calibrated)
    torch.testing.assert_close(h1[~is_image], h0[~is_image])  # text positions untouched at that layer
    torch.testing.assert_close(h1[is_image], h0[is_image] + 0.5)  # image positions shifted
    from lvlm.config.schema import StageConfig
    from lvlm.train import stages

    assert stages.apply_stage(model, StageConfig())["moca"] is True
    assert all(p.requires_grad for p in model.moca.parameters())
