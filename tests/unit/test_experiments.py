"""Every shipped experiment builds: real backbone names, real token counts, reduced random weights.

For every config under ``configs/`` -- plain configs, every stage of a pipeline, every stage of every grid cell
(expanded with lvlm's own grid and pipeline loaders) -- the backbone names must be in the table of real
architectures (``known_backbones.KNOWN``), so a typo fails here with the file and the name. Each distinct
model shape is then built through ``lvlm.models.build.build_lvlm`` from reduced random copies of the same
families at the real image and patch sizes (width 64, 2 layers), its ``tokens_per_image`` checked against the
count the experiment implies, and run forward with a loss (plus LoRA on the configured target modules where
a stage uses it). The table itself is checked against open_clip's built-in configs and, for the LLMs, against
the size in the name (real-size models built on the meta device, nothing allocated). No network.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml
from known_backbones import KNOWN, LAYERS, WIDTH, HEADS, HFLLM, HFVision, OpenCLIPArch, Reduced, is_toy
from torch import nn

from lvlm.config.schema import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    Config,
    HFVisionConfig,
    LinearConnectorConfig,
    MLPConnectorConfig,
    ModelConfig,
    OpenCLIPVisionConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    TokenMergeConnectorConfig,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PAPERS = ("llava15", "mir", "vila", "mm1", "bunny")


@dataclass
class Experiment:
    """One trainable config: a plain config, a pipeline stage, or a stage of one grid cell."""

    path: Path
    where: str  # file, cell and stage, for messages
    cfg: Config | None = None
    error: str | None = None


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _expand(base: Path, args: list[str], where: str, path: Path) -> list[Experiment]:
    from lvlm.config import load_config
    from lvlm.config.pipeline import is_pipeline, load_pipeline

    if is_pipeline(base):
        return [Experiment(path, f"{where} stage {name}", cfg) for name, cfg in load_pipeline(base, args).stages]
    return [Experiment(path, where, load_config(base, args))]


def load_experiments(path: Path) -> list[Experiment]:
    """Every trainable config a YAML file under configs/ stands for; a load error becomes one failed entry."""
    from lvlm.ablate.grid import load_grid

    where = _rel(path) if path.is_relative_to(ROOT) else str(path)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage on a bad key
            doc = yaml.safe_load(path.read_text()) or {}
            if "axes" not in doc:
                return _expand(path, [], where, path)
            grid = load_grid(path)
            out = []
            for cell in grid.cells():
                out += _expand(grid.base, cell.args, f"{where} cell {cell.name}", path)
            return out
    except Exception as e:  # reported by test_every_config_loads
        return [Experiment(path, where, error=f"{type(e).__name__}: {e}")]


FILES = sorted(CONFIGS.rglob("*.yaml"))
EXPERIMENTS = {path: load_experiments(path) for path in FILES}
ALL = [e for exps in EXPERIMENTS.values() for e in exps if e.cfg is not None]


# ------------------------------------------------------------------------------------------ backbone names

def vision_name(vision) -> str:
    return vision.name_or_path if isinstance(vision, HFVisionConfig) else vision.arch


def names_used(cfg: Config) -> list[tuple[str, str]]:
    """(config key, backbone name) pairs of a config."""
    key = "model.vision.name_or_path" if isinstance(cfg.model.vision, HFVisionConfig) else "model.vision.arch"
    out = [(key, vision_name(cfg.model.vision)), ("model.llm.name_or_path", cfg.model.llm.name_or_path)]
    if cfg.model.llm.tokenizer:
        out.append(("model.llm.tokenizer", cfg.model.llm.tokenizer))
    return out


def check_backbones(exp: Experiment) -> list[str]:
    """Problems with the backbones an experiment names, each naming the file, the key and the value."""
    cfg, errors = exp.cfg, []
    kinds = {"model.vision.name_or_path": HFVision, "model.vision.arch": OpenCLIPArch,
             "model.llm.name_or_path": HFLLM, "model.llm.tokenizer": HFLLM}
    for key, name in names_used(cfg):
        if is_toy(name):
            continue
        entry = KNOWN.get(name)
        if entry is None:
            errors.append(f"{exp.where}: unknown backbone {name!r} ({key}); not in tests/unit/known_backbones.py "
                          "KNOWN -- a typo, or add the real architecture there")
        elif not isinstance(entry, kinds[key]):
            errors.append(f"{exp.where}: {key} names {name!r}, which is a {type(entry).__name__}, not a "
                          f"{kinds[key].__name__}")
    vision, stage = cfg.model.vision, cfg.stage
    ventry = KNOWN.get(vision_name(vision))
    if isinstance(vision, OpenCLIPVisionConfig) and isinstance(ventry, OpenCLIPArch) and vision.pretrained:
        if not Path(vision.pretrained).suffix and vision.pretrained not in ventry.tags:
            errors.append(f"{exp.where}: model.vision.pretrained {vision.pretrained!r} is not a known weight tag "
                          f"of {vision.arch} (known: {', '.join(ventry.tags)})")
    if isinstance(ventry, (HFVision, OpenCLIPArch)):
        depth = ventry.layers
        if not -(depth + 1) <= vision.feature_layer <= depth:
            errors.append(f"{exp.where}: model.vision.feature_layer {vision.feature_layer} is outside the real "
                          f"{depth}-block tower of {vision_name(vision)}")
        if stage.vision_from_layer > depth:
            errors.append(f"{exp.where}: stage.vision_from_layer {stage.vision_from_layer} > {depth} blocks")
    lentry = KNOWN.get(cfg.model.llm.name_or_path)
    if isinstance(lentry, HFLLM) and stage.llm_up_to_layer > lentry.layers:
        errors.append(f"{exp.where}: stage.llm_up_to_layer {stage.llm_up_to_layer} > the {lentry.layers} decoder "
                      f"layers of {cfg.model.llm.name_or_path}")
    return errors


def test_every_paper_has_experiments():
    for paper in PAPERS:
        files = list((CONFIGS / "experiments" / paper).glob("*.yaml"))
        assert files, f"no experiment configs under configs/experiments/{paper}/"
    grids = [p for p in FILES if "axes" in (yaml.safe_load(p.read_text()) or {})]
    assert len(grids) >= 12 and len(ALL) >= 80


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_every_config_loads(path):
    errors = [e.error for e in EXPERIMENTS[path] if e.error]
    assert not errors, f"{_rel(path)}: {errors[0]}"


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_backbone_names_are_real(path):
    errors = [msg for e in EXPERIMENTS[path] if e.cfg is not None for msg in check_backbones(e)]
    assert not errors, "\n".join(errors)


def test_a_typo_in_a_backbone_name_fails_with_file_and_name(tmp_path):
    base = CONFIGS / "llava15" / "stage1_pretrain.yaml"
    doc = yaml.safe_load(base.read_text())
    doc["model"]["llm"]["name_or_path"] = "lmsys/vicuna-7b-v15"
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(doc))
    (msg,) = [m for e in load_experiments(bad) for m in check_backbones(e)]
    assert str(bad) in msg and "'lmsys/vicuna-7b-v15'" in msg and "model.llm.name_or_path" in msg
    grid = tmp_path / "grid.yaml"  # a typo in one grid cell names the grid file and the cell
    grid.write_text(f"base: {CONFIGS / 'experiments/mm1/ablation_base.yaml'}\nrun_dir: runs/x\naxes:\n"
                    "  model.vision.arch: [ViT-L-14-336, ViT-L-14-3366]\n")
    (msg,) = [m for e in load_experiments(grid) for m in check_backbones(e)]
    assert str(grid) in msg and "cell arch=ViT-L-14-3366" in msg and "'ViT-L-14-3366' (model.vision.arch)" in msg
    tag_typo = "[ViT-L-14]\n  model.vision.pretrained: [opena1]"
    grid.write_text(grid.read_text().replace("[ViT-L-14-336, ViT-L-14-3366]", tag_typo))
    (msg,) = [m for e in load_experiments(grid) for m in check_backbones(e)]
    assert "pretrained 'opena1' is not a known weight tag of ViT-L-14" in msg
    doc["model"]["llm"]["name_or_path"] = "microsoft/phi-2"
    doc["model"]["vision"]["feature_layer"] = -30  # beyond the real 24-block CLIP-L
    bad.write_text(yaml.safe_dump(doc))
    (msg,) = [m for e in load_experiments(bad) for m in check_backbones(e)]
    assert "feature_layer -30" in msg and "24-block" in msg


# ------------------------------------------------------------------------------------- the table is real

OPEN_CLIP = [n for n, e in KNOWN.items() if isinstance(e, OpenCLIPArch)]
HF = [n for n, e in KNOWN.items() if not isinstance(e, OpenCLIPArch)]


@pytest.mark.parametrize("arch", OPEN_CLIP)
def test_open_clip_entries_match_open_clip(arch):
    import open_clip
    from known_backbones import open_clip_dims, params, real_vision_tower

    entry = KNOWN[arch]
    visual = real_vision_tower(arch)
    assert open_clip_dims(visual) == dict(width=entry.width, layers=entry.layers, heads=entry.heads,
                                          image_size=entry.image_size, patch_size=entry.patch_size,
                                          prefix_tokens=entry.prefix_tokens)
    assert set(entry.tags) <= set(open_clip.list_pretrained_tags_by_model(arch))
    assert math.isclose(params(visual), entry.nominal, rel_tol=0.1), params(visual)


@pytest.mark.parametrize("name", HF)
def test_real_size_matches_the_name(name):
    from known_backbones import params, real_llm_params, real_vision_tower, within

    entry = KNOWN[name]
    count = real_llm_params(entry) if isinstance(entry, HFLLM) else params(real_vision_tower(name))
    assert within(count, entry.nominal), f"{name}: {count / 1e9:.3f}B parameters, expected ~{entry.nominal / 1e9}B"


def test_every_known_backbone_is_used():
    used = {n for e in ALL for _, n in names_used(e.cfg)}
    assert not set(KNOWN) - used, "table entries no config names: drop them"


# ------------------------------------------------------------------------------------ shapes and forward

def expected_tokens(model: ModelConfig) -> int:
    """Image tokens per image the experiment implies, from the real encoder's table entry (not from lvlm)."""
    entry = KNOWN[vision_name(model.vision)]
    side = (model.vision.image_size or entry.image_size) // entry.patch_size
    patches = side * side + (entry.prefix_tokens if model.vision.keep_cls else 0)
    c = model.connector
    if isinstance(c, (LinearConnectorConfig, MLPConnectorConfig)):
        return patches
    if isinstance(c, TokenMergeConnectorConfig):
        return math.ceil(side / c.kernel) ** 2
    if isinstance(c, (AvgPoolConnectorConfig, CAbstractorConnectorConfig, ResamplerConnectorConfig,
                      QFormerConnectorConfig)):
        return c.tokens
    raise TypeError(f"no token rule for {type(c).__name__}: add one here")


def reduced_connector(c):
    """The same connector and token count at the reduced width (explicit widths and depths shrunk)."""
    if isinstance(c, QFormerConnectorConfig):
        return replace(c, layers=min(c.layers, LAYERS), heads=HEADS, hidden_size=WIDTH)
    if isinstance(c, ResamplerConnectorConfig):
        return replace(c, layers=min(c.layers, LAYERS), heads=HEADS, hidden_size=c.hidden_size and WIDTH)
    if isinstance(c, CAbstractorConnectorConfig):
        return replace(c, num_blocks=1, hidden_size=c.hidden_size and WIDTH)
    return c


def uses_lora(cfg: Config) -> bool:
    return cfg.stage.train_llm and cfg.stage.lora.r > 0


def shape_key(cfg: Config) -> tuple:
    m, v = cfg.model, cfg.model.vision
    lora = (tuple(cfg.stage.lora.target_modules), bool(cfg.stage.llm_up_to_layer)) if uses_lora(cfg) else None
    return (type(v).__name__, vision_name(v), v.image_size, v.feature_layer, v.keep_cls, repr(m.connector),
            m.llm.name_or_path, m.llm.dtype, m.moca, lora)


def _buildable(e: Experiment) -> bool:
    return all(n in KNOWN for _, n in names_used(e.cfg))


SHAPES: dict[tuple, list[Experiment]] = {}
for _e in ALL:
    if _buildable(_e):
        SHAPES.setdefault(shape_key(_e.cfg), []).append(_e)
SHAPE_IDS = [f"{i:02d}-{exps[0].where.removeprefix('configs/').replace(' ', ':')}"
             for i, exps in enumerate(SHAPES.values())]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    return Reduced(tmp_path_factory.mktemp("reduced_backbones"))


def reduced_model_config(model: ModelConfig, reduced: Reduced) -> ModelConfig:
    v = model.vision
    if isinstance(v, HFVisionConfig):
        v = replace(v, name_or_path=reduced.path(v.name_or_path), random_init=False)
    else:
        v = replace(v, arch=reduced.path(v.arch), pretrained="")
    attn = "sdpa" if "flash" in model.llm.attn_implementation else model.llm.attn_implementation
    llm = replace(model.llm, name_or_path=reduced.path(model.llm.name_or_path), tokenizer="", attn_implementation=attn)
    return replace(model, vision=v, connector=reduced_connector(model.connector), llm=llm)


def _forward_with_loss(model, tokenizer, where: str) -> None:
    text = tokenizer("a photo of the cat", add_special_tokens=False).input_ids
    bos = [model.llm.bos_token_id] if model.llm.bos_token_id is not None else []
    prompt = bos + [model.image_token_id] * model.tokens_per_image
    ids = torch.tensor([prompt + text + [model.llm.eos_token_id]])
    labels = torch.tensor([[-100] * len(prompt) + text + [model.llm.eos_token_id]])
    size = model.vision.image_size
    with torch.no_grad():
        feats = model.encode_images(torch.randn(1, 3, size, size))
        out = model(ids, labels=labels, pixel_values=torch.randn(1, 3, size, size))
    assert feats.shape == (1, model.tokens_per_image, model.llm.hidden_size), where
    assert int(out.num_tokens) == len(text) + 1 and torch.isfinite(out.loss), where


@pytest.mark.parametrize("key", list(SHAPES), ids=SHAPE_IDS)
def test_model_shape_builds_and_runs(key, reduced):
    from lvlm.models.build import build_lvlm
    from lvlm.train.lora import add_lora

    exps = SHAPES[key]
    cfg, where = exps[0].cfg, f"{exps[0].where} (and {len(exps) - 1} more with this shape)"
    model, _, tokenizer = build_lvlm(reduced_model_config(cfg.model, reduced))
    model.eval()
    assert model.vision.image_size == (cfg.model.vision.image_size or KNOWN[vision_name(cfg.model.vision)].image_size)
    assert model.tokens_per_image == expected_tokens(cfg.model), where
    assert (model.moca is not None) == cfg.model.moca
    _forward_with_loss(model, tokenizer, where)
    if uses_lora(cfg):
        linear = {n.rsplit(".", 1)[-1] for n, m in model.llm.model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in cfg.stage.lora.target_modules if t not in linear]
        assert not missing, (f"{where}: stage.lora.target_modules {missing} are not linear layers of "
                             f"{cfg.model.llm.name_or_path} (its linear layers: {', '.join(sorted(linear))})")
        stage = replace(cfg.stage, llm_up_to_layer=min(cfg.stage.llm_up_to_layer, LAYERS))
        add_lora(model, stage)
        assert any(".lora_A." in n for n, _ in model.named_parameters()), where
        _forward_with_loss(model, tokenizer, where)


EXPECTED = [  # (file, cell/stage fragment, tokens per image): the counts the papers state
    ("experiments/llava15/pipeline.yaml", "stage align", 576),          # CLIP-L/336 + MLP: 24 x 24
    ("experiments/mir/connector.yaml", "connector=qformer", 32),        # BLIP-2-style 32 queries
    ("experiments/vila/projector.yaml", "token_merge2x2", 144),         # 2 x 2 merge of 24 x 24
    ("experiments/bunny/backbones.yaml", "encoder=siglip", 729),        # SigLIP-384 / 14: 27 x 27
    ("experiments/bunny/backbones.yaml", "encoder=eva02", 576),
    ("experiments/mm1/connector.yaml", "resolution=224__tokens=64__connector=avg_pool", 64),
    ("experiments/mm1/image_encoder.yaml", "vit-h14_378", 144),         # C-Abstractor 144 on 27 x 27
]


@pytest.mark.parametrize("file, fragment, tokens", EXPECTED, ids=lambda x: str(x))
def test_stated_token_counts(file, fragment, tokens):
    matches = [e for e in EXPERIMENTS[CONFIGS / file] if e.cfg is not None and fragment in e.where]
    assert matches, f"no experiment of {file} matches {fragment!r}"
    assert {expected_tokens(e.cfg.model) for e in matches} == {tokens}


def test_every_real_experiment_has_a_checked_shape():
    real = [e for e in ALL if not any(is_toy(n) for _, n in names_used(e.cfg))]
    assert sum(len(v) for v in SHAPES.values()) == len(real) and len(SHAPES) < len(real)
