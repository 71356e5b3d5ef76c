"""Export to transformers LLaVA: the reloaded LlavaForConditionalGeneration must give the lvlm model's
logits on the same input_ids (N placeholders per image) + pixel_values; unexportable models are refused
with the reason; the CLI round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_fixtures import backbones, batch, max_logit_diff, model_config, trained_run, unexportable_run
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvlm.cli.export import main as export_main
from lvlm.config import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    HFVisionConfig,
    LinearConnectorConfig,
    MLPConnectorConfig,
    OpenCLIPVisionConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    TokenMergeConnectorConfig,
)
from lvlm.export import ExportError, export_llava

TOL = 1e-4

# (vision checkpoint kind, llm, connector, HFVisionConfig kwargs, expected strategy, projector act, vision blocks)
CASES = {
    "clip-mlp2-gelu-nocls": ("clip_vision", "llama", MLPConnectorConfig(depth=2), {}, "default", "gelu", 2),
    "clip-mlp2-relu-cls": ("clip_vision", "llama", MLPConnectorConfig(depth=2, activation="relu"),
                           {"keep_cls": True}, "full", "relu", 2),
    "clip2tower-linear-last": ("clip", "llama", LinearConnectorConfig(), {"feature_layer": -1}, "default", "linear",
                               3),
    "clip-mlp1-layer1": ("clip_vision", "llama", MLPConnectorConfig(depth=1), {"feature_layer": 1}, "default",
                         "linear", 1),
    "clip-silu-84px": ("clip_vision", "llama", MLPConnectorConfig(depth=2, activation="silu"), {"image_size": 84},
                       "default", "silu", 2),
    "siglip-mlp2-gelu": ("siglip_vision", "llama", MLPConnectorConfig(depth=2), {}, "full", "gelu", 2),
    "siglip-tanh-28px": ("siglip", "llama", MLPConnectorConfig(depth=2, activation="tanh"),
                         {"image_size": 28}, "full", "tanh", 2),                # SigLIP has no CLS to keep
    "clip-qwen2": ("clip_vision", "qwen2", MLPConnectorConfig(depth=2), {}, "default", "gelu", 2),
    "clip-tied-llama-linear": ("clip_vision", "llama_tied", LinearConnectorConfig(), {}, "default", "linear", 2),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("export_backbones")


def _load(out) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_exported_llava_gives_the_same_logits(assets, tmp_path, case):
    kind, llm, connector, vision_kw, strategy, act, blocks = CASES[case]
    model_cfg = model_config(*backbones(assets, kind, llm), connector=connector, **vision_kw)
    model, tokenizer = trained_run(tmp_path / "run", model_cfg)
    out = export_llava(tmp_path / "run", tmp_path / "out")
    llava = _load(out)

    cfg = llava.config
    assert (cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (strategy, act)
    assert cfg.vision_config.num_hidden_layers == blocks and cfg.vision_feature_layer == -1
    assert cfg.image_token_index == model.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert cfg.image_seq_length == model.tokens_per_image
    assert cfg.vision_config.image_size == model.vision.image_size
    assert cfg.tie_word_embeddings == model.llm.model.config.tie_word_embeddings

    inputs = batch(model, tokenizer)
    diff = max_logit_diff(model, llava, inputs)
    print(f"{case}: max |logit diff| = {diff:.3e}")
    assert diff < TOL
    # negative control: the comparison sees the images (other images give clearly different logits)
    swapped = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
    with torch.no_grad():
        other = llava(**swapped).logits
        ours = model(**inputs, return_logits=True).logits
    assert float((other - ours)[inputs["attention_mask"].bool()].abs().max()) > 100 * TOL


def test_export_writes_a_processor_that_expands_one_image_token(assets, tmp_path):
    model, tokenizer = trained_run(tmp_path / "run", model_config(*backbones(assets)))
    out = export_llava(tmp_path / "run", tmp_path / "out")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "lvlm_export.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "lvlm_export.json").read_text())
    assert record["lvlm_feature_layer"] == -2 and record["vision_blocks_kept"] == 2
    processor = AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (70, 90, 3), dtype=np.uint8))
    enc = processor(text="<image> a red circle", images=image, return_tensors="pt")
    assert int((enc["input_ids"] == model.image_token_id).sum()) == model.tokens_per_image
    transform = model.vision.image_transform()
    assert torch.allclose(enc["pixel_values"][0], transform(image), atol=0.05)  # lvlm's one-step resize
    with torch.no_grad():  # and the processor's output runs through the exported model
        logits = _load(out)(**enc).logits
    assert logits.shape[1] == enc["input_ids"].shape[1] and torch.isfinite(logits).all()


@pytest.mark.parametrize("vision, connector, moca, message", [
    (OpenCLIPVisionConfig(arch="ViT-B-32", pretrained=""), MLPConnectorConfig(), False,
     "open_clip towers are not transformers models"),
    (HFVisionConfig(name_or_path="/nonexistent/vision"), MLPConnectorConfig(), True,
     "MoCa calibrates image tokens with hooks"),
    (HFVisionConfig(name_or_path="/nonexistent/vision"), MLPConnectorConfig(depth=3), False,
     "depth 3 cannot be exported: LLaVA's projector is exactly two linear layers"),
    *[(HFVisionConfig(name_or_path="/nonexistent/vision"), conn, False,
       f"model.connector.type {name} cannot be exported: LLaVA's projector is a linear layer or a 2-layer MLP")
      for name, conn in (("avg_pool", AvgPoolConnectorConfig()), ("token_merge", TokenMergeConnectorConfig()),
                         ("c_abstractor", CAbstractorConnectorConfig()), ("resampler", ResamplerConnectorConfig()),
                         ("qformer", QFormerConnectorConfig()))],
])
def test_unexportable_models_are_refused_with_the_reason(tmp_path, vision, connector, moca, message):
    run = unexportable_run(tmp_path / "run", vision, connector, moca)
    with pytest.raises(ExportError, match=message):
        export_llava(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untrained_random_parts_are_refused(assets, tmp_path):
    vision_dir, llm_dir = backbones(assets)
    cfg = model_config(vision_dir, llm_dir)
    cfg.vision.random_init = True  # a random, frozen tower: not in the checkpoint, not loadable
    trained_run(tmp_path / "run", cfg)
    with pytest.raises(ExportError, match="neither in .*trainable.safetensors nor loaded"):
        export_llava(tmp_path / "run", tmp_path / "out")


def test_non_empty_output_directory_is_refused(assets, tmp_path):
    trained_run(tmp_path / "run", model_config(*backbones(assets)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_llava(tmp_path / "run", tmp_path / "out")


def test_cli_round_trip(assets, tmp_path, capsys):
    model, tokenizer = trained_run(tmp_path / "run", model_config(*backbones(assets)))
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert export_main(["hf", str(ckpt), str(tmp_path / "out")]) == 0  # a checkpoint dir works as well
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "config.json" in printed
    assert max_logit_diff(model, _load(tmp_path / "out"), batch(model, tokenizer)) < TOL

    refused = unexportable_run(tmp_path / "moca", HFVisionConfig(name_or_path="/nonexistent"),
                               MLPConnectorConfig(), moca=True)
    assert export_main(["hf", str(refused), str(tmp_path / "out2")]) == 2
    assert "lvlm export: model.moca is on" in capsys.readouterr().err
    assert export_main(["hf", str(tmp_path / "nope"), str(tmp_path / "out3")]) == 2
    assert "neither a complete checkpoint" in capsys.readouterr().err
    assert export_main(["onnx", str(ckpt), str(tmp_path / "out4")]) == 2
    assert export_main(["--help"]) == 0


def test_bf16_llm_exports_with_its_dtype(assets, tmp_path):
    cfg = model_config(*backbones(assets))
    cfg.llm.dtype = "bfloat16"
    model, tokenizer = trained_run(tmp_path / "run", cfg)
    out = export_llava(tmp_path / "run", tmp_path / "out")
    auto = LlavaForConditionalGeneration.from_pretrained(out).eval()  # config.dtype: the LLM's
    assert auto.lm_head.weight.dtype == torch.bfloat16 and auto.model.vision_tower.dtype == torch.bfloat16
    fp32 = _load(out)  # runs the tower in fp32 as lvlm does; LLM weights are bf16 values
    inputs = batch(model, tokenizer)
    print(f"bf16: max |logit diff| auto {max_logit_diff(model, auto, inputs):.3e}, "
          f"fp32 {max_logit_diff(model, fp32, inputs):.3e}")
    assert max_logit_diff(model, auto, inputs) < 2e-2 and max_logit_diff(model, fp32, inputs) < 2e-2


def test_lora_adapter_checkpoint_exports_merged(assets, tmp_path):
    """A LoRA stage that kept its adapters apart (stage.lora.save: adapter) exports with them merged."""
    from lvlm.config.schema import LoRAConfig, StageConfig
    from lvlm.train import lora

    model_cfg = model_config(*backbones(assets, "clip_vision", "llama"))
    model, tokenizer = trained_run(tmp_path / "run", model_cfg)
    stage = StageConfig(train_llm=True, lora=LoRAConfig(r=4, alpha=8, dropout=0.0, save="adapter"))
    lora.add_lora(model, stage)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    adapters = {}
    for name, layer in lora.lora_layers(model).items():
        adapters.update(lora.adapter_tensors(name, layer))
    lora.save_adapter(ckpt, adapters, stage, len(model.llm.decoder_layers()))
    llava = _load(export_llava(tmp_path / "run", tmp_path / "out"))
    inputs = batch(model, tokenizer)
    assert max_logit_diff(model.eval(), llava, inputs) < TOL
    # negative control: without the adapter the export differs
    (ckpt / lora.ADAPTER_DIR / "adapter_config.json").unlink()
    plain = _load(export_llava(tmp_path / "run", tmp_path / "out2"))
    assert max_logit_diff(model, plain, inputs) > 100 * TOL
