"""Config loading: every shipped YAML parses, overrides apply, bad configs are refused with a clear message."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from lvlm.config import Config, ConfigError, dump_config, load_config
from lvlm.config.schema import HFVisionConfig, LinearConnectorConfig, OpenCLIPVisionConfig

ROOT = Path(__file__).resolve().parents[2]
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))
# ablation grids (top-level ``axes``) are checked cell by cell in test_ablate.py
SHIPPED = [p for p in ALL_YAML if "axes" not in (yaml.safe_load(p.read_text()) or {})]


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_parses_and_round_trips(path, tmp_path):
    from lvlm.config.pipeline import is_pipeline, load_pipeline

    configs = [cfg for _, cfg in load_pipeline(path).stages] if is_pipeline(path) else [load_config(path)]
    for i, cfg in enumerate(configs):
        again = tmp_path / f"again{i}.yaml"
        again.write_text(dump_config(cfg))
        assert load_config(again) == cfg


def test_toy_yaml_equals_embedded_default():
    assert load_config(ROOT / "configs/toy/stage1.yaml") == load_config(None)
    assert load_config(None) == Config()


def test_dotted_overrides_swap_backbones():
    cfg = load_config(None, ["--model.vision.type", "hf", "--model.vision.name_or_path", "/x",
                             "--optim.lr", "2e-5", "--model.connector.type", "linear"])
    assert isinstance(cfg.model.vision, HFVisionConfig) and cfg.model.vision.name_or_path == "/x"
    assert isinstance(cfg.model.connector, LinearConnectorConfig)
    assert cfg.optim.lr == 2e-5


def test_override_of_choice_field_keeps_current_type():
    cfg = load_config(ROOT / "configs/llava15/stage1_pretrain.yaml", ["--model.vision.feature_layer", "-1"])
    assert isinstance(cfg.model.vision, HFVisionConfig) and cfg.model.vision.feature_layer == -1
    cfg = load_config(None, ["--model.connector.depth", "3"])
    assert cfg.model.connector.depth == 3
    assert isinstance(load_config(None).model.vision, OpenCLIPVisionConfig)


@pytest.mark.parametrize("overrides, expected", [
    (["--model.vision.type", "timm"], "valid choices: hf, open_clip"),
    (["--model.connector.type", "perceiver"],
     "valid choices: avg_pool, c_abstractor, linear, mlp, qformer, resampler, token_merge"),
    (["--data.source.type", "csv"], "valid choices: interleaved, llava_json, text, webdataset"),
    (["--train.zero_stage", "4"], "train.zero_stage; valid choices: 0, 1, 2, 3"),
    (["--train.precision", "fp16"], "valid choices: fp32, bf16"),
    (["--optim.schedule", "step"], "valid choices: cosine, linear, constant"),
    (["--model.llm.dtype", "float64"], "valid choices: float32, bfloat16, float16"),
    (["--model.vision.resize", "stretch"], "model.vision.resize; valid choices: auto, crop, squash, pad"),
    (["--model.connector.activation", "swish"], "valid choices: gelu, relu, silu, tanh"),
    (["--optim.lr", "fast"], "optim.lr"),
    (["--train.micro_batch_size", "0"], "train.micro_batch_size must be > 0"),
    (["--stage.train_connector", "false"], "stage trains nothing"),
    (["--optim.warmup_ratio", "1.5"], "optim.warmup_ratio"),
    # non-finite numbers: lr inf trained to nan losses, grad_clip nan silently turned clipping off
    (["--optim.lr", "inf"], "optim.lr must be > 0 and finite, got inf"),
    (["--optim.lr", "nan"], "optim.lr must be > 0 and finite, got nan"),
    (["--optim.grad_clip", "nan"], "optim.grad_clip must be >= 0 and finite, got nan"),
    # data-source choices: refused at load, not by the loader after the model build
    (["--data.source.type", "llava_json", "--data.source.format", "bogus"],
     "invalid value 'bogus' for data.source.format; valid choices: plain, chat"),
    (["--data.source.type", "text", "--data.source.format", "csv"],
     "data.source.format; valid choices: jsonl, webdataset, parquet"),
    (["--data.source.type", "interleaved", "--data.source.image_position", "middle"],
     "data.source.image_position; valid choices: before, after"),
    (["--data.source.type", "interleaved", "--data.source.max_images", "-1"], "data.source.max_images must be >= 0"),
    (["--data.mixture.a.source.type", "llava_json", "--data.mixture.a.source.format", "x"],
     "data.mixture.a.source.format; valid choices: plain, chat"),
    (["--mir.texts.type", "text", "--mir.texts.format", "txt"], "mir.texts.format; valid choices"),
    (["--mir.max_length", "-5"], "mir.max_length must be > 0"),
    (["--model.connector.type", "qformer", "--model.connector.cross_attention_every", "0"],
     "model.connector.cross_attention_every must be > 0"),
    (["--model.llm.image_token", " "], "model.llm.image_token is empty"),
    (["--mir.system_prompt", ""], "mir.system_prompt is empty"),
    (["--mir.num_samples", "0"], "mir.num_samples must be >= 1"),
    # keys the rest of the config leaves without effect
    (["--data.source.type", "interleaved", "--data.source.image_position", "after"],
     "applies to format mmc4 only"),
    (["--data.source.type", "interleaved", "--data.source.image_folder", "/imgs"],
     "data.source.image_folder is set but data.source.format is 'webdataset'"),
    (["--data.source.type", "text", "--data.source.format", "webdataset", "--data.source.field", "body"],
     "data.source.field 'body' is set but data.source.format is 'webdataset'"),
    (["--optim.schedule", "constant", "--optim.min_lr_ratio", "0.1"], "optim.min_lr_ratio is 0.1 but optim.schedule"),
    (["--data.mix_by", "tokens"], "data.mix_by is 'tokens' but there is no data.mixture"),
    (["--stage.lora.alpha", "32"], "stage.lora.alpha set but stage.lora.r is 0"),
    (["--stage.lora.save", "adapter"], "stage.lora.save set but stage.lora.r is 0"),
])
def test_bad_overrides_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_unknown_yaml_key_names_key_and_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "learning_rate" in str(e.value) and "lr" in str(e.value) and "warmup_ratio" in str(e.value)


def test_unknown_key_inside_choice_lists_that_choice_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vision:\n    type: hf\n    name: foo\n")
    with pytest.raises(ConfigError, match="name_or_path"):
        load_config(bad)


def test_invalid_choice_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vision:\n    type: clip\n")
    with pytest.raises(ConfigError, match="hf, open_clip"):
        load_config(bad)


def test_resume_is_stored_in_one_spelling():
    """`--resume false` parses as the string 'False'; the config (and config.yaml) keeps 'false'."""
    assert load_config(None, ["--resume", "False"]).resume == "false"
    assert load_config(None, ["--resume", "force"]).resume == "force"


def test_missing_file_and_unknown_flag():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="--optim.learning_rate"):
        load_config(None, ["--optim.learning_rate", "1"])


def test_cli_refuses_bad_config_before_any_work(capsys, tmp_path):
    from lvlm.cli.main import main

    rc = main(["train", "--train.zero_stage", "7", "--run_dir", str(tmp_path / "r")])
    assert rc == 2
    assert "valid choices: 0, 1, 2, 3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_mixture_overrides_keep_order_and_toy_paths_resolve_inside_the_mixture(monkeypatch, tmp_path):
    """Mixture order breaks schedule ties, so an override must not reorder it; toy:// paths inside
    data.mixture entries are resolved like any other."""
    import lvlm.toy as toy

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "data_recipes" / "vila_pretrain.yaml", ["--data.mixture.mmc4.weight", "2"])
    assert list(cfg.data.mixture) == ["mmc4", "coyo"] and cfg.data.mixture["mmc4"].weight == 2.0
    monkeypatch.setattr(toy, "prepare", lambda root=None, spec=None: tmp_path)   # no asset build in a unit test
    resolved = toy.resolve_config(cfg)
    for comp in resolved.data.mixture.values():
        paths = [v for v in vars(comp.source).values() if isinstance(v, str) and v]
        assert paths and not any(p.startswith("toy://") for p in paths)
        assert any(p.startswith(str(tmp_path)) for p in paths)


def test_type_override_over_a_yaml_with_the_old_types_fields(tmp_path):
    """An ablation cell switching the connector type of a base that sets an MLP's depth."""
    path = ROOT / "configs/llava15/stage1_pretrain.yaml"
    cfg = load_config(path, ["--model.connector.type", "qformer", "--model.connector.tokens", "16"])
    assert type(cfg.model.connector).__name__ == "QFormerConnectorConfig" and cfg.model.connector.tokens == 16
    assert load_config(path, ["--model.connector.type", "mlp"]).model.connector.depth == 2  # same type: kept
    cfg = load_config(path, ["--data.source.type=webdataset", "--data.source.shards", "/d/x.tar"])
    assert cfg.data.source.shards == "/d/x.tar"
    assert path.read_text().count("llava_json") >= 1  # the shipped file itself is untouched


def test_mixture_weight_zero_leaves_a_source_out(monkeypatch):
    import lvlm.data.build as build

    monkeypatch.setattr(build, "build_source", lambda cfg, resolve_path=None, name="": name)  # no files read
    mix = ROOT / "data_recipes/mm1_45_45_10.yaml"
    cfg = load_config(mix, ["--data.mixture.text.weight", "0"])
    names = [name for name, _, _ in build.build_sources(cfg.data)]
    assert "text" not in names and len(names) == 2
    with pytest.raises(ConfigError, match="every data.mixture weight is 0"):
        load_config(mix, [f"--data.mixture.{n}.weight" if i % 2 == 0 else "0"
                          for n in cfg.data.mixture for i in range(2)])


def test_mir_probe_sources_take_any_source_and_the_string_form(tmp_path):
    """mir.images / mir.texts are data sources of any type; a plain string keeps its original meaning
    (webdataset shards / a jsonl file with a `text` field), in YAML, on the command line and in a pipeline."""
    from lvlm.config.schema import LLaVAJsonSourceConfig, TextSourceConfig, WebDatasetSourceConfig

    y = tmp_path / "c.yaml"
    y.write_text("mir:\n  images: /x/val-{000000..000002}.tar\n  texts: /x/cnn.jsonl\n")
    from_yaml = load_config(y)
    from_cli = load_config(None, ["--mir.images", "/x/val-{000000..000002}.tar", "--mir.texts=/x/cnn.jsonl"])
    assert from_yaml.mir.images == from_cli.mir.images == WebDatasetSourceConfig(shards="/x/val-{000000..000002}.tar")
    assert from_yaml.mir.texts == from_cli.mir.texts == TextSourceConfig(format="jsonl", files="/x/cnn.jsonl")
    typed = load_config(y, ["--mir.images.type", "llava_json", "--mir.images.json_path", "/x/a.json",
                            "--mir.images.image_folder", "/x/img", "--mir.texts.format", "parquet",
                            "--mir.texts.field", "article"])
    assert typed.mir.images == LLaVAJsonSourceConfig(json_path="/x/a.json", image_folder="/x/img")
    assert typed.mir.texts == TextSourceConfig(format="parquet", files="/x/cnn.jsonl", field="article")
    again = tmp_path / "dumped.yaml"
    again.write_text(dump_config(typed))
    assert load_config(again).mir == typed.mir  # the dumped (typed) form loads back
    y.write_text("mir:\n  images: {type: interleaved, format: webdataset, files: /x/docs.tar}\n")
    assert load_config(y).mir.images.files == "/x/docs.tar"
    with pytest.raises(ConfigError, match="valid choices: interleaved, llava_json, text, webdataset"):
        load_config(None, ["--mir.texts.type", "csv"])


@pytest.mark.parametrize("overrides, expected", [
    (["--optim.beta1", "-0.1"], "optim.beta1 must be in [0, 1), got -0.1"),
    (["--optim.beta1", "1.0"], "optim.beta1 must be in [0, 1), got 1.0"),
    (["--optim.beta2", "1.5"], "optim.beta2 must be in [0, 1), got 1.5"),
    (["--optim.eps", "0"], "optim.eps must be a finite number > 0, got 0.0"),
    (["--optim.eps=-1e-8"], "optim.eps must be a finite number > 0, got -1e-08"),
    (["--optim.weight_decay", "-0.1"], "optim.weight_decay must be a finite number >= 0, got -0.1"),
    (["--optim.weight_decay", "nan"], "optim.weight_decay must be a finite number >= 0, got nan"),
])
def test_out_of_range_adamw_values_are_refused_at_load(overrides, expected):
    """AdamW would take them (or fail only once the optimizer is built): refused with the key, value and range."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, overrides)


def test_adamw_edge_values_in_range_load():
    cfg = load_config(None, ["--optim.beta1", "0", "--optim.beta2", "0.95", "--optim.eps", "1e-6",
                             "--optim.weight_decay", "0"])
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay) == (0.0, 0.95, 1e-6, 0.0)


@pytest.mark.parametrize("overrides, expected", [
    (["--stage.lr.vision", "1e-5"], "stage.lr.vision is set (1e-05) but stage.train_vision is false: it would "
                                    "have no effect"),
    (["--stage.lr.llm", "1e-5"], "stage.lr.llm is set (1e-05) but stage.train_llm is false"),
    (["--stage.train_llm", "true", "--stage.train_connector", "false", "--stage.lr.connector", "1e-3"],
     "stage.lr.connector is set (0.001) but stage.train_connector is false"),
    (["--stage.lr.moca", "1e-5"], "stage.lr.moca is set (1e-05) but model.moca is false: there is no MoCa to train"),
    (["--model.moca", "true", "--stage.train_moca", "false", "--stage.lr.moca", "1e-5"],
     "stage.lr.moca is set (1e-05) but MoCa does not train"),
])
def test_stage_lr_for_a_part_that_does_not_train_is_refused(overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, overrides)


def test_stage_lr_for_trained_parts_loads():
    cfg = load_config(None, ["--stage.train_llm", "true", "--stage.lr.llm", "2e-5", "--stage.lr.connector", "1e-3",
                             "--model.moca", "true", "--stage.lr.moca", "1e-4"])  # MoCa trains with the connector
    assert (cfg.stage.lr.llm, cfg.stage.lr.connector, cfg.stage.lr.moca) == (2e-5, 1e-3, 1e-4)
    cfg = load_config(None, ["--stage.train_vision", "true", "--stage.lr.vision", "1e-6"])
    assert cfg.stage.lr.vision == 1e-6


@pytest.mark.parametrize("extra, expected", [
    (["--stage.train_vision", "true", "--stage.vision_from_layer", "99"],
     "config error: stage.vision_from_layer 99 leaves nothing to train"),
    (["--model.vision.feature_layer", "-40"], "config error: feature_layer=-40 is out of range"),
    (["--data.max_length", "8"], "config error: data: data.max_length=8 leaves no room for one image"),
    ([], "config error: data: no shard file matches"),
    (["--data.source.shards", "SHARDS", "--mir.every", "5"], "config error: MIR probe (mir.*): "),
], ids=["stage", "feature_layer", "max_length", "missing_shards", "missing_probe"])
def test_what_only_the_built_model_can_judge_is_a_clean_config_error(tmp_path, extra, expected):
    """Values judged once the model is built (stage.vision_from_layer past the encoder's blocks, a feature
    layer past the tower, data.max_length below one image, missing data or probe files): `lvlm train` still
    exits 2 with a config error (no traceback) and writes nothing; with `resume false` the earlier run in
    run_dir stays where it was (it was moved to superseded/ before the model was built, and data and probe
    errors came as tracebacks after the run directory was written)."""
    import subprocess
    import sys

    from data_fixtures import caption_member, write_shard
    from model_fixtures import save_llm
    from vision_fixtures import save_hf

    save_hf("clip", tmp_path / "clip")
    save_llm("llama", tmp_path / "llama")
    write_shard(str(tmp_path / "train-000000.tar"), [caption_member(f"{i:04d}", i) for i in range(4)])
    extra = [str(tmp_path / "train-000000.tar") if a == "SHARDS" else a for a in extra]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')                 # an earlier run's files
    cmd = [sys.executable, "-m", "lvlm", "train", "--resume", "false", "--model.vision.type", "hf",
           "--model.vision.name_or_path", str(tmp_path / "clip"), "--model.llm.name_or_path", str(tmp_path / "llama"),
           "--data.source.shards", str(tmp_path / "none-{000000..000001}.tar"), "--mir.every", "0",
           "--mir.images", str(tmp_path / "none.tar"), "--mir.texts", str(tmp_path / "none.jsonl"),
           "--run_dir", str(run), *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"lvlm train: {expected}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]   # nothing moved or written
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_unknown_cli_key_gets_the_yaml_message_not_a_usage_dump(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage:\n  lr:\n    lm: 1.0e-5\n")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(bad)
    with pytest.raises(ConfigError) as from_cli:
        load_config(None, ["--train.max_steps", "3", "--stage.lr.lm", "1e-5"])
    want = "unknown key(s) lm under 'stage.lr'; valid keys: vision, connector, llm, moca"
    assert str(from_yaml.value) == want and str(from_cli.value).startswith(want)
    assert "--stage.lr.lm" in str(from_cli.value)
    assert "usage:" not in capsys.readouterr().err  # argparse never ran
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) lrr under 'optim'; valid keys: lr, weight_decay")):
        load_config(None, ["--optim.lrr=1e-5"])
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) foo under '<top level>'; valid keys: run_dir")):
        load_config(None, ["--foo", "1"])
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) x under 'optim.lr': optim.lr is a value")):
        load_config(None, ["--optim.lr.x", "1"])
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) foo under 'model.connector'; valid keys: type,")):
        load_config(None, ["--model.connector.foo", "1"])
    assert "usage:" not in capsys.readouterr().err
