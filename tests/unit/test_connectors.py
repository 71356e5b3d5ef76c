"""Connectors of issue 5 (MM1, VILA, MIR papers): avg_pool, token_merge, c_abstractor, resampler, qformer.

Each maps [B, n_in, in_dim] to [B, num_tokens(n_in), out_dim]; every parameter and the input get a
gradient; grid connectors compute what they claim (pooling windows, space-to-depth order, padding);
bad values are refused at load time (config) and at build time (patch grid, CLS token) with the keys
named; a full LVLM built by ``build_lvlm`` with each connector trains a step; ``lvlm info`` counts them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from model_fixtures import save_llm
from torch import nn
from transformers import CLIPVisionConfig
from vision_fixtures import save_hf

from lvlm.config import ConfigError, load_config
from lvlm.config.schema import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    ConnectorConfig,
    HFVisionConfig,
    LLMConfig,
    ModelConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    TokenMergeConnectorConfig,
)
from lvlm.info import model_sizes
from lvlm.models.build import build_lvlm
from lvlm.models.connectors import build_connector, check_fits
from lvlm.models.vision import build_vision

IN, OUT = 32, 48

# (config, n_in, expected output tokens): a realistic 24 x 24 = 576 patch grid (CLIP ViT-L/14-336) and a small one
CASES = {
    "avg_pool-576": (AvgPoolConnectorConfig(tokens=144), 576, 144),
    "avg_pool-16": (AvgPoolConnectorConfig(tokens=4, depth=1, activation="silu"), 16, 4),
    "token_merge-576": (TokenMergeConnectorConfig(kernel=2), 576, 144),
    "token_merge-25-padded": (TokenMergeConnectorConfig(kernel=2, depth=3, activation="relu"), 25, 9),
    "token_merge-16-k3": (TokenMergeConnectorConfig(kernel=3), 16, 4),
    "c_abstractor-576": (CAbstractorConnectorConfig(tokens=64, num_blocks=1, hidden_size=16), 576, 64),
    "c_abstractor-16": (CAbstractorConnectorConfig(tokens=4), 16, 4),
    "resampler-576": (ResamplerConnectorConfig(tokens=64, heads=4), 576, 64),
    "resampler-16-proj": (ResamplerConnectorConfig(tokens=3, layers=1, heads=2, hidden_size=24), 16, 3),
    "qformer-576": (QFormerConnectorConfig(tokens=32, heads=4, hidden_size=64), 576, 32),
    "qformer-17-cls": (QFormerConnectorConfig(tokens=5, layers=1, heads=2, hidden_size=16), 17, 5),
    "qformer-blip2-every-2nd": (QFormerConnectorConfig(tokens=4, layers=2, heads=2, hidden_size=16,
                                                       cross_attention_every=2), 16, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shape_token_count_and_gradients(case):
    cfg, n_in, tokens = CASES[case]
    torch.manual_seed(0)
    conn = build_connector(cfg, in_dim=IN, out_dim=OUT)
    assert (conn.in_dim, conn.out_dim) == (IN, OUT) and conn.name == ConnectorConfig.get_choice_name(type(cfg))
    assert conn.num_tokens(n_in) == tokens
    x = torch.randn(2, n_in, IN, requires_grad=True)
    y = conn(x)
    assert y.shape == (2, tokens, OUT) and torch.isfinite(y).all()
    y.sum().backward()
    no_grad = [n for n, p in conn.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_mm1_token_counts_for_clip_vit_l_14_336(tmp_path):
    """CLIP ViT-L/14-336: 24 x 24 = 576 patches of width 1024 -> avg_pool 64 / 144, token_merge k=2 -> 144."""
    CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14).save_pretrained(tmp_path)
    with torch.device("meta"):
        vision = build_vision(HFVisionConfig(name_or_path=str(tmp_path), random_init=True))
        expected = [(AvgPoolConnectorConfig(tokens=64), 64), (AvgPoolConnectorConfig(tokens=144), 144),
                    (TokenMergeConnectorConfig(kernel=2), 144), (CAbstractorConnectorConfig(tokens=144), 144),
                    (ResamplerConnectorConfig(), 64), (QFormerConnectorConfig(), 32)]
        assert (vision.num_tokens(), vision.embed_dim) == (576, 1024)
        for cfg, tokens in expected:
            conn = build_connector(cfg, in_dim=vision.embed_dim, out_dim=4096)
            assert check_fits(conn, vision) == tokens, cfg


def test_avg_pool_averages_patch_windows():
    conn = build_connector(AvgPoolConnectorConfig(tokens=64, depth=1), in_dim=IN, out_dim=OUT)
    conn.mlp = nn.Identity()  # look at the pooled features themselves
    x = torch.randn(2, 576, IN)
    grid = x.reshape(2, 24, 24, IN)
    window = grid[:, 3:6, 6:9].mean(dim=(1, 2))  # output row 1, column 2 (8 x 8 of 3 x 3 windows)
    torch.testing.assert_close(conn(x)[:, 1 * 8 + 2], window)
    ref = F.avg_pool2d(grid.permute(0, 3, 1, 2), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(conn(x), ref)


@pytest.mark.parametrize("side, kernel", [(4, 2), (5, 2), (7, 3)])
def test_token_merge_is_space_to_depth_with_zero_padding(side, kernel):
    conn = build_connector(TokenMergeConnectorConfig(kernel=kernel, depth=1), in_dim=IN, out_dim=OUT)
    conn.norm, conn.mlp = nn.Identity(), nn.Identity()  # look at the merged channels themselves
    x = torch.randn(2, side * side, IN)
    grid = x.reshape(2, side, side, IN)
    merged = -(-side // kernel)
    out = conn(x)
    assert out.shape == (2, merged * merged, kernel * kernel * IN) == (2, conn.num_tokens(side * side), *out.shape[2:])
    for i in range(merged):
        for j in range(merged):
            parts = [grid[:, r, c] if r < side and c < side else torch.zeros(2, IN)
                     for r in range(i * kernel, (i + 1) * kernel) for c in range(j * kernel, (j + 1) * kernel)]
            torch.testing.assert_close(out[:, i * merged + j], torch.cat(parts, dim=-1))


def test_query_connectors_ignore_input_count():
    for cfg in (ResamplerConnectorConfig(tokens=7, heads=4), QFormerConnectorConfig(tokens=7, heads=4, hidden_size=32)):
        conn = build_connector(cfg, in_dim=IN, out_dim=OUT)
        assert {conn.num_tokens(n) for n in (1, 16, 577, 729)} == {7}
        assert conn(torch.randn(1, 10, IN)).shape == (1, 7, OUT)


@pytest.mark.parametrize("cfg, n_in, message", [
    (AvgPoolConnectorConfig(tokens=16), 577, "avg_pool needs a square patch grid, got 577 input tokens"),
    (TokenMergeConnectorConfig(), 577, "token_merge needs a square patch grid, got 577 .*model.vision.keep_cls"),
    (CAbstractorConnectorConfig(tokens=16), 50, "c_abstractor needs a square patch grid, got 50"),
    (AvgPoolConnectorConfig(tokens=64), 16, r"tokens 64 \(8x8\) exceeds the 4x4 patch grid \(16 tokens\)"),
    (CAbstractorConnectorConfig(tokens=25), 16, r"tokens 25 \(5x5\) exceeds the 4x4 patch grid"),
])
def test_grid_connectors_refuse_inputs_that_are_no_grid(cfg, n_in, message):
    conn = build_connector(cfg, in_dim=IN, out_dim=OUT)
    with pytest.raises(ValueError, match=message):
        conn.num_tokens(n_in)
    with pytest.raises(ValueError, match=message):
        conn(torch.randn(1, n_in, IN))


@pytest.mark.parametrize("cfg, message", [
    (AvgPoolConnectorConfig(tokens=50), "model.connector.tokens must be a perfect square > 0 .*got 50"),
    (AvgPoolConnectorConfig(tokens=0), "perfect square > 0 .*got 0"),
    (CAbstractorConnectorConfig(tokens=63), "perfect square > 0 .*got 63"),
    (AvgPoolConnectorConfig(activation="swish"), "unknown activation 'swish'; valid: gelu, relu, silu, tanh"),
    (TokenMergeConnectorConfig(kernel=0), "model.connector.kernel must be >= 1, got 0"),
    (CAbstractorConnectorConfig(num_blocks=0), "model.connector.num_blocks must be >= 1, got 0"),
    (ResamplerConnectorConfig(heads=5), r"heads 5 must divide the hidden size 32 .*hidden_size 0; 0 = the vision"),
    (ResamplerConnectorConfig(tokens=0), "model.connector.tokens must be >= 1, got 0"),
    (QFormerConnectorConfig(heads=7, hidden_size=64), "heads 7 must divide model.connector.hidden_size 64"),
    (QFormerConnectorConfig(layers=0), "model.connector.layers must be >= 1, got 0"),
])
def test_bad_values_are_refused_at_build(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_connector(cfg, in_dim=IN, out_dim=OUT)


@pytest.mark.parametrize("overrides, message", [
    (["--model.connector.type", "avg_pool", "--model.connector.tokens", "50"],
     "model.connector.tokens must be a perfect square > 0 for model.connector.type avg_pool"),
    (["--model.connector.type", "c_abstractor", "--model.connector.tokens", "-4"], "perfect square > 0"),
    (["--model.connector.type", "c_abstractor", "--model.connector.num_blocks", "0"], "model.connector.num_blocks"),
    (["--model.connector.type", "token_merge", "--model.connector.kernel", "0"], "model.connector.kernel must be > 0"),
    (["--model.connector.type", "token_merge", "--model.connector.activation", "swish"],
     "valid choices: gelu, relu, silu, tanh"),
    (["--model.connector.type", "avg_pool", "--model.connector.depth", "0"], "model.connector.depth must be > 0"),
    (["--model.connector.type", "resampler", "--model.connector.hidden_size", "100", "--model.connector.heads", "3"],
     "heads 3 does not divide model.connector.hidden_size 100; valid heads: 1, 2, 4, 5, 10, 20, 25, 50, 100"),
    (["--model.connector.type", "resampler", "--model.connector.tokens", "0"], "model.connector.tokens must be > 0"),
    (["--model.connector.type", "qformer", "--model.connector.heads", "7"],
     "heads 7 does not divide model.connector.hidden_size 768; valid heads: 1, 2, 3, 4, 6, 8, 12,"),
    (["--model.connector.type", "qformer", "--model.connector.hidden_size", "0"], "hidden_size must be > 0"),
    (["--model.connector.type", "perceiver"],
     "valid choices: avg_pool, c_abstractor, linear, mlp, qformer, resampler, token_merge"),
])
def test_bad_values_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_types_fields_and_defaults():
    cfg = load_config(None, ["--model.connector.type", "c_abstractor", "--model.connector.tokens", "144"])
    assert cfg.model.connector == CAbstractorConnectorConfig(tokens=144, num_blocks=3, hidden_size=0)
    defaults = {"avg_pool": AvgPoolConnectorConfig(64, 2, "gelu"),
                "token_merge": TokenMergeConnectorConfig(2, 2, "gelu"),
                "c_abstractor": CAbstractorConnectorConfig(64, 3, 0),
                "resampler": ResamplerConnectorConfig(64, 2, 8, 0),
                "qformer": QFormerConnectorConfig(32, 2, 8, 768)}
    for name, default in defaults.items():
        assert load_config(None, ["--model.connector.type", name]).model.connector == default


# ------------------------------------------------------------------- through build_lvlm


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP vision tower (56 px, 14 px patches: a 4 x 4 grid + CLS, width 32) and a tiny Llama (width 32)."""
    root = tmp_path_factory.mktemp("connectors")
    save_hf("clip_vision", root / "clip")
    save_llm("llama", root / "llama")
    return {"clip": root / "clip", "llama": root / "llama"}


TINY = {  # model.connector for the 4 x 4 grid -> expected tokens_per_image
    "avg_pool": (AvgPoolConnectorConfig(tokens=4), 4),
    "token_merge": (TokenMergeConnectorConfig(kernel=2), 4),
    "token_merge-k3-padded": (TokenMergeConnectorConfig(kernel=3), 4),
    "c_abstractor": (CAbstractorConnectorConfig(tokens=4, num_blocks=1, hidden_size=16), 4),
    "resampler": (ResamplerConnectorConfig(tokens=3, layers=1, heads=4), 3),
    "qformer": (QFormerConnectorConfig(tokens=5, layers=1, heads=4, hidden_size=32), 5),
}


def _model(backbones, connector: ConnectorConfig, **vision) -> ModelConfig:
    return ModelConfig(vision=HFVisionConfig(name_or_path=str(backbones["clip"]), **vision), connector=connector,
                       llm=LLMConfig(name_or_path=str(backbones["llama"])))


def _batch(model, images: int = 2) -> tuple[torch.Tensor, ...]:
    """One row: BOS, ``images`` x tokens_per_image placeholders, 5 text tokens (supervised)."""
    ids = [model.llm.bos_token_id] + [model.image_token_id] * model.tokens_per_image * images + list(range(5, 10))
    ids = torch.tensor([ids])
    labels = torch.where(ids == model.image_token_id, -100, ids)
    labels[:, 0] = -100
    pixels = torch.randn(images, 3, model.vision.image_size, model.vision.image_size)
    return ids, torch.ones_like(ids), labels, pixels


@pytest.mark.parametrize("case", list(TINY))
def test_full_lvlm_trains_with_each_connector(backbones, case):
    cfg, tokens = TINY[case]
    torch.manual_seed(0)
    model, _, _ = build_lvlm(_model(backbones, cfg))
    assert model.tokens_per_image == tokens and model.connector.num_tokens(16) == tokens
    ids, attn, labels, pixels = _batch(model)
    out = model(ids, attn, labels, pixels)
    assert int(out.num_tokens) == 5 and torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    assert all(p.grad is not None for p in model.connector.parameters())
    assert any(bool(p.grad.abs().sum() > 0) for p in model.connector.parameters())
    with pytest.raises(ValueError, match="image placeholder tokens"):  # one image too few for the placeholders
        model(ids, attn, labels, pixels[:1])


@pytest.mark.parametrize("case", ["avg_pool", "token_merge", "c_abstractor"])
def test_grid_connector_with_cls_token_is_refused_at_build(backbones, case):
    cfg, _ = TINY[case]
    with pytest.raises(ValueError, match=f"model.connector.type {case} pools the square patch grid, but "
                                         "model.vision.keep_cls is true .* 1 CLS/prefix token"):
        build_lvlm(_model(backbones, cfg, keep_cls=True))


def test_query_connector_takes_cls_token(backbones):
    model, _, _ = build_lvlm(_model(backbones, TINY["resampler"][0], keep_cls=True))
    assert model.vision.num_tokens() == 17 and model.tokens_per_image == 3
    ids, attn, labels, pixels = _batch(model, images=1)
    assert torch.isfinite(model(ids, attn, labels, pixels).loss_sum)


def test_bf16_llm_casts_the_connector(backbones):
    model_cfg = _model(backbones, TINY["qformer"][0])
    model_cfg.llm.dtype = "bfloat16"
    model, _, _ = build_lvlm(model_cfg)
    assert {p.dtype for p in model.connector.parameters()} == {torch.bfloat16}
    feats = model.encode_images(torch.randn(2, 3, 56, 56))
    assert feats.shape == (2, 5, 32) and feats.dtype == torch.bfloat16


@pytest.mark.parametrize("connector", [{"type": "avg_pool", "tokens": 4}, {"type": "qformer", "tokens": 5,
                                                                            "heads": 4, "hidden_size": 32}])
def test_info_counts_new_connectors_on_meta(backbones, tmp_path, connector):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision": {"type": "hf", "name_or_path": str(backbones["clip"])},
                                              "connector": connector,
                                              "llm": {"name_or_path": str(backbones["llama"])}}}))
    cfg = load_config(path)
    model, _, _ = build_lvlm(cfg.model)
    sizes = {p.name: (p.params, p.trainable, p.cls) for p in model_sizes(cfg)}
    n = sum(p.numel() for p in model.connector.parameters())
    assert sizes["connector"] == (n, n, type(model.connector).__name__)


def test_data_spec_gets_the_connector_token_count_without_weights(backbones):
    """``lvlm data inspect`` sizes image spans from the same rule, built on the meta device."""
    from lvlm.data.inspect import data_spec_for

    for case in ("avg_pool", "token_merge-k3-padded", "qformer"):
        cfg, tokens = TINY[case]
        assert data_spec_for(_model(backbones, cfg)).tokens_per_image == tokens
    with pytest.raises(ValueError, match="model.vision.keep_cls is true"):
        data_spec_for(_model(backbones, TINY["c_abstractor"][0], keep_cls=True))
