"""Export a trained lvlm checkpoint as a transformers ``LlavaForConditionalGeneration``.

Owns: deciding whether a model config can be expressed as LLaVA (``check_exportable``), rebuilding
the trained model from a run's ``config.yaml`` + ``trainable.safetensors`` (as ``lvlm mir`` does),
mapping its weights onto LLaVA's names and writing a directory that loads with transformers alone:
weights (safetensors), ``config.json``, tokenizer files, a ``LlavaProcessor`` (CLIP-style image
processor) and ``lvlm_export.json`` (where it came from, what was mapped how).

Mapping (checked against transformers 5's ``modeling_llava``):
- vision: the HF tower as lvlm holds it, i.e. truncated after the feature layer, so the exported
  tower has ``num_hidden_layers`` = the blocks that exist and ``vision_feature_layer = -1`` (HF's
  hidden states of CLIP/SigLIP are captured before the post-layernorm, as lvlm's features are). The
  post-layernorm, which neither lvlm nor LLaVA features use, is written as an identity LayerNorm;
  SigLIP's pooling head is dropped (``vision_use_head = False``). A non-native ``image_size`` is baked
  in: the position table is resampled once with the tower's own ``interpolate_pos_encoding``.
- CLS: LLaVA's "default" strategy drops exactly the first token, "full" keeps all: CLIP without CLS
  -> default, CLIP with CLS and SigLIP (no CLS at all) -> full.
- projector: LLaVA's is always linear_1 -> act -> linear_2 with biases. mlp depth 2 maps 1:1; a single
  linear layer (``linear`` or mlp depth 1) maps exactly as linear_1, act "linear" (identity) and
  linear_2 = identity matrix with zero bias.
- the image token: ``image_token_index`` = the id of the tokenizer's added ``<image>``; the model
  expects ``image_seq_length`` placeholder tokens per image in ``input_ids`` (lvlm's data layout).

Assumes: frozen weights are not in the checkpoint, they come from the backbones named in the run's
config (for ZeRO-3 runs too: ``trainable.safetensors`` holds the gathered fp32 trained weights only),
so those backbone paths must be readable when exporting. Tensors keep their lvlm dtypes (vision fp32,
projector and LLM in the LLM's dtype); ``config.dtype`` is the LLM's, so ``dtype="auto"`` follows it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from lvlm.config.schema import (
    Config,
    ConnectorConfig,
    HFVisionConfig,
    LinearConnectorConfig,
    MLPConnectorConfig,
    ModelConfig,
)

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "tanh": "tanh"}
"""lvlm connector activation -> transformers ACT2FN name computing the same function."""


class ExportError(ValueError):
    """The model cannot be written as LlavaForConditionalGeneration; the message says what and why."""


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, from the config alone, models that LLaVA cannot represent."""
    if not isinstance(cfg.vision, HFVisionConfig):
        raise ExportError(f"model.vision.type {type(cfg.vision).__name__} cannot be exported: LLaVA's vision tower "
                          "must be a transformers vision model (CLIP/SigLIP, model.vision.type hf); open_clip towers "
                          "are not transformers models and have no LLaVA weight layout")
    if cfg.moca:
        raise ExportError("model.moca is on: MoCa calibrates image tokens with hooks inside every decoder layer, "
                          "and LlavaForConditionalGeneration has no place for them (its forward would silently "
                          "skip the calibration)")
    conn = cfg.connector
    if isinstance(conn, MLPConnectorConfig):
        if conn.depth > 2:
            raise ExportError(f"model.connector.depth {conn.depth} cannot be exported: LLaVA's projector is exactly "
                              "two linear layers (linear_1, act, linear_2); depth 1 or 2 only")
        if conn.activation not in ACTIVATIONS:
            raise ExportError(f"model.connector.activation {conn.activation!r} has no transformers equivalent; "
                              f"exportable: {', '.join(ACTIVATIONS)}")
    elif not isinstance(conn, LinearConnectorConfig):
        name = ConnectorConfig.get_choice_name(type(conn))
        raise ExportError(f"model.connector.type {name} cannot be exported: LLaVA's projector is a linear layer or "
                          "a 2-layer MLP applied to every vision token, with no pooling, merging, convolution or "
                          "attention (exportable: linear, mlp with depth <= 2)")


def load_run(ckpt_or_run_dir: str | Path) -> tuple[Config, Path]:
    """(config, checkpoint dir) of a run directory or one of its checkpoints; refuses unexportable models
    before any ``toy://`` asset is built, then resolves the model section only."""
    from lvlm import toy
    from lvlm.config import load_config
    from lvlm.train.checkpoint import find_checkpoint
    from lvlm.train.rundir import config_file

    _, ckpt = find_checkpoint(ckpt_or_run_dir)
    cfg = load_config(config_file(ckpt))
    check_exportable(cfg.model)
    return dataclasses.replace(cfg, model=toy.resolve_config(cfg.model)), ckpt


def rebuild(cfg: Config, ckpt: Path):
    """(model in eval mode, tokenizer): built from config under the run's seed, as training built it (so
    the rows a frozen LLM gets for the added ``<image>`` token are the training-time ones), then the
    trained weights are loaded. Refuses when a part with no pretrained weights was not trained."""
    from lvlm.train.checkpoint import build_as_trained, load_stage_weights

    model, _, tokenizer = build_as_trained(cfg)
    try:  # a LoRA stage that kept its adapters apart is exported with them merged
        loaded = set(load_stage_weights(model, ckpt))
    except ValueError as e:  # weights the config's model lacks
        raise ExportError(str(e)) from e
    random_parts = ["connector."] + (["vision."] if cfg.model.vision.random_init else [])
    random_parts += ["llm."] if cfg.model.llm.random_init else []
    unset = [n for n, _ in model.named_parameters() if n.startswith(tuple(random_parts)) and n not in loaded]
    if unset:
        raise ExportError(f"{len(unset)} weights (e.g. {unset[:3]}) are neither in {ckpt}/trainable.safetensors nor "
                          "loaded from a pretrained backbone (random_init, frozen): the export would hold a fresh "
                          "random initialisation, not the trained model")
    return model.eval(), tokenizer


def _select_strategy(model) -> str:
    """LLaVA's "default" drops exactly the first token, "full" keeps all."""
    if model.vision.num_prefix_tokens > 1:
        raise ExportError("the vision tower has several prefix tokens; LLaVA's 'default' strategy drops one")
    return "full" if model.vision.keep_cls or model.vision.num_prefix_tokens == 0 else "default"


def llava_config(model):
    """The LlavaConfig describing ``model`` (an exportable, rebuilt LVLM)."""
    from transformers import LlavaConfig

    vision, tower = model.vision, model.vision.model
    n_layers = len(getattr(tower, "vision_model", tower).encoder.layers)
    if n_layers == 0:
        raise ExportError(f"model.vision.feature_layer {vision.feature_layer} selects the patch embeddings (hidden "
                          "state 0); LLaVA collects vision hidden states from its blocks, so at least one is needed")
    vcfg = copy.deepcopy(tower.config)
    vcfg.num_hidden_layers, vcfg.image_size = n_layers, vision.image_size
    if hasattr(vcfg, "vision_use_head"):
        vcfg.vision_use_head = False
    conn = model.connector
    act = "linear" if len(_projector_linears(conn)) == 1 else ACTIVATIONS[_activation_name(conn)]
    return LlavaConfig(vision_config=vcfg, text_config=copy.deepcopy(model.llm.model.config),
                       image_token_index=model.image_token_id, image_seq_length=model.tokens_per_image,
                       projector_hidden_act=act, vision_feature_select_strategy=_select_strategy(model),
                       vision_feature_layer=-1, multimodal_projector_bias=True)


def _projector_linears(conn: nn.Module) -> list[nn.Linear]:
    return [m for m in conn.modules() if isinstance(m, nn.Linear)]


def _activation_name(conn: nn.Module) -> str:
    """The one activation between the two linear layers (nn.GELU's default is ACT2FN's exact "gelu")."""
    by_cls = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}
    acts = [m for m in conn.modules() if type(m) in by_cls]
    if len(acts) != 1 or getattr(acts[0], "approximate", "none") != "none":
        raise ExportError(f"connector activations {acts} do not fit LLaVA's projector (one exact gelu/relu/silu/tanh)")
    return by_cls[type(acts[0])]


def _projector_weights(conn: nn.Module) -> dict[str, torch.Tensor]:
    linears = _projector_linears(conn)
    if len(linears) == 2:
        first, second = linears
        return {"linear_1.weight": first.weight, "linear_1.bias": first.bias,
                "linear_2.weight": second.weight, "linear_2.bias": second.bias}
    if len(linears) == 1:  # exact: act "linear" is the identity, linear_2 = I x + 0
        (only,) = linears
        out, dtype = only.out_features, only.weight.dtype
        return {"linear_1.weight": only.weight, "linear_1.bias": only.bias,
                "linear_2.weight": torch.eye(out, dtype=dtype), "linear_2.bias": torch.zeros(out, dtype=dtype)}
    raise ExportError(f"connector has {len(linears)} linear layers; LLaVA's projector holds 1 or 2")


def _vision_weights(model, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for the keys of LLaVA's ``vision_tower`` (``target``: its meta state dict)."""
    tower = model.vision.model
    ours = tower.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, meta in target.items():
        if key.endswith("position_embedding.weight") and key in ours and ours[key].shape != meta.shape:
            emb = tower.get_submodule(key.rsplit(".", 2)[0])  # the tower's embeddings module
            size = model.vision.image_size
            with torch.no_grad():  # the table lvlm's forward interpolates to on every call
                out[key] = emb.interpolate_pos_encoding(torch.zeros(1, *meta.shape), size, size)[0].clone()
        elif key in ours:
            out[key] = ours[key]
        elif ".post_layernorm." in f".{key}":
            out[key] = torch.ones(meta.shape) if key.endswith("weight") else torch.zeros(meta.shape)
        else:
            raise ExportError(f"LLaVA's vision tower needs {key!r}, which lvlm's tower does not have")
    extra = sorted(set(ours) - set(target))
    if extra:
        raise ExportError(f"lvlm's vision tower has weights LLaVA's has no place for: {extra[:5]}")
    return out


def _llm_weights(model, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    causal = model.llm.model
    base = causal.base_model
    head = causal.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ExportError(f"{type(causal).__name__}'s output head is not a bias-free linear layer like LLaVA's lm_head")
    ours = base.state_dict()
    head_names = {n for n, p in causal.named_parameters(remove_duplicate=False) if p is head.weight}
    outside = sorted(set(causal.state_dict()) - {f"{causal.base_model_prefix}.{k}" for k in ours} - head_names)
    if outside:
        raise ExportError(f"{type(causal).__name__} has weights outside its base model and lm_head: {outside[:5]}")
    missing = sorted(set(target) - set(ours))
    if missing:
        raise ExportError(f"LLaVA's language model needs {missing[:5]}, which {type(base).__name__} does not have")
    return {k: ours[k] for k in target} | {"lm_head.weight": head.weight}


def to_llava(model):
    """An in-memory LlavaForConditionalGeneration sharing ``model``'s tensors (nothing is copied but the
    resampled position table and the identity parts)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(model)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    for ours, theirs, what in ((model.vision.model, llava.model.vision_tower, "vision tower"),
                               (model.llm.model.base_model, llava.model.language_model, "language model")):
        if type(ours) is not type(theirs):
            raise ExportError(f"LLaVA would build its {what} as {type(theirs).__name__}, "
                              f"lvlm has {type(ours).__name__}")
    sections = {"model.vision_tower.": lambda t: _vision_weights(model, t),
                "model.multi_modal_projector.": lambda t: _projector_weights(model.connector),
                "model.language_model.": lambda t: _llm_weights(model, t)}
    target = llava.state_dict()
    state: dict[str, torch.Tensor] = {}
    for prefix, fill in sections.items():
        part = {k[len(prefix):]: v for k, v in target.items() if k.startswith(prefix)}
        weights = fill(part)
        head = weights.pop("lm_head.weight", None)
        if head is not None:
            state["lm_head.weight"] = head
        state |= {prefix + k: v.detach() for k, v in weights.items()}
    missing, unexpected = llava.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _fill_buffers(llava, model)
    if config.tie_word_embeddings:
        llava.tie_weights()
    return llava.eval()


def _fill_buffers(llava, model) -> None:
    """Non-persistent buffers (position ids, rotary tables) are still on meta: take lvlm's, or a fresh
    vision embeddings module's where the image size changed their shape."""
    fresh_emb = type(llava.model.vision_tower.embeddings)(llava.config.vision_config)  # small: patch conv + table
    sources = {"model.vision_tower.embeddings.": dict(fresh_emb.named_buffers()),
               "model.vision_tower.": dict(model.vision.model.named_buffers()),
               "model.language_model.": dict(model.llm.model.base_model.named_buffers())}
    for name, buf in list(llava.named_buffers()):
        if not buf.is_meta:
            continue
        prefix = next((p for p in sources if name.startswith(p) and name[len(p):] in sources[p]), None)
        value = sources[prefix][name[len(prefix):]] if prefix else None
        if value is None or value.shape != buf.shape:
            raise ExportError(f"cannot materialise buffer {name!r} of the exported model")
        owner, _, attr = name.rpartition(".")
        llava.get_submodule(owner).register_buffer(attr, value.clone(), persistent=False)


def _processor(model, tokenizer, config):
    """A LlavaProcessor that expands one ``<image>`` into ``image_seq_length`` placeholders and preprocesses
    like lvlm (bicubic resize of the short side, centre crop, normalise; lvlm's one-step resize differs
    from it by about one grey level)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = model.vision.image_size
    images = CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                                crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=list(model.vision.mean), image_std=list(model.vision.std),
                                do_convert_rgb=True)
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=model.vision.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          image_token=image_token, num_additional_image_tokens=model.vision.num_prefix_tokens)


def write_llava(model, tokenizer, out_dir: str | Path, provenance: dict | None = None) -> list[Path]:
    """Write ``model`` (a rebuilt, exportable LVLM) to ``out_dir`` as LLaVA; returns the files written."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {out} is not empty; choose a new or empty directory")
    llava = to_llava(model)
    processor = _processor(model, tokenizer, llava.config)
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(out)
    # save_pretrained records the vision tower's dtype; "auto" loading should follow the LLM (the bulk)
    llava.config.dtype = model.llm.model.dtype
    llava.config.save_pretrained(out)
    processor.save_pretrained(out)
    keys = ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act", "image_token_index",
            "image_seq_length")
    record = {**(provenance or {}), **{k: getattr(llava.config, k) for k in keys},
              "lvlm_feature_layer": model.vision.feature_layer, "image_size": model.vision.image_size,
              "vision_blocks_kept": llava.config.vision_config.num_hidden_layers,
              "vision_post_layernorm": "identity (unused: LLaVA takes hidden states before it)"}
    (out / "lvlm_export.json").write_text(json.dumps(record, indent=2))
    return sorted(p for p in out.rglob("*") if p.is_file())


def export_llava(ckpt_or_run_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the run's model from its config + trained weights and write it as LLaVA to ``out_dir``.

    Needs the backbones named in the run's config (frozen weights are read from there). Raises
    ``ExportError`` for models LLaVA cannot represent (config-level reasons before anything is built);
    nothing is written unless the weight mapping is complete.
    """
    cfg, ckpt = load_run(ckpt_or_run_dir)
    model, tokenizer = rebuild(cfg, ckpt)
    write_llava(model, tokenizer, out_dir, provenance={"checkpoint": str(Path(ckpt).resolve())})
    return Path(out_dir)
