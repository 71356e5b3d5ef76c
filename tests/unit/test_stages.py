"""Stages: partial unfreezing, LoRA (inject -> merge / adapter in peft's format), per-part learning rates,
the per-layer gradient check, stage-key validation, and pipeline files (merge rules, init_from chaining)."""
from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_fixtures import save_llm
from vision_fixtures import save_hf

from lvlm.config import ConfigError, load_config
from lvlm.config.schema import Config, HFVisionConfig, LLMConfig, LoRAConfig, ModelConfig, StageConfig
from lvlm.models.build import build_lvlm
from lvlm.train import lora, stages


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    llm = save_llm("llama", tmp_path_factory.mktemp("llama"))
    vdir = tmp_path_factory.mktemp("clip")
    save_hf("clip_vision", vdir)
    return {"llm": str(llm), "vision": str(vdir)}


def build(dirs, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vision=HFVisionConfig(name_or_path=dirs["vision"]), llm=LLMConfig(name_or_path=dirs["llm"]))
    return build_lvlm(cfg)[0]


def batch(model):
    t = model.tokens_per_image
    ids = torch.tensor([[model.llm.bos_token_id] + [model.image_token_id] * t + list(range(5, 12))])
    labels = ids.clone()
    labels[:, : 1 + t] = -100
    size = model.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels)


def trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_llm_up_to_layer_trains_only_the_first_layers(dirs):
    model = build(dirs)
    plan = stages.apply_stage(model, StageConfig(train_connector=False, train_llm=True, llm_up_to_layer=1))
    assert plan == {"vision": False, "connector": False, "llm": True}
    names = trainable(model.llm)
    assert names and all(".layers.0." in n for n in names)
    assert not model.llm.model.get_input_embeddings().weight.requires_grad
    model(**batch(model)).loss_sum.backward()
    stages.check_gradients(model, plan, lambda p: p.grad)
    layer1 = next(p for n, p in model.llm.named_parameters() if ".layers.1." in n)
    layer1.grad = torch.ones_like(layer1)
    with pytest.raises(RuntimeError, match="freezes 'llm layer 1'"):
        stages.check_gradients(model, plan, lambda p: p.grad)


def test_vision_from_layer_and_the_per_block_gradient_check(dirs):
    model = build(dirs)
    n = len(model.vision.blocks())
    plan = stages.apply_stage(model, StageConfig(train_vision=True, vision_from_layer=n - 1))
    blocks = model.vision.blocks()
    assert all(p.requires_grad for p in blocks[n - 1].parameters())
    assert not any(p.requires_grad for b in blocks[: n - 1] for p in b.parameters())
    model(**batch(model)).loss_sum.backward()
    stages.check_gradients(model, plan, lambda p: p.grad)
    last = set(map(id, blocks[n - 1].parameters()))
    with pytest.raises(RuntimeError, match=f"trains 'vision layer {n - 1}' but it received no gradient"):
        stages.check_gradients(model, plan, lambda p: None if id(p) in last else p.grad)
    with pytest.raises(ValueError, match="vision_from_layer"):
        stages.apply_stage(model, StageConfig(train_vision=True, vision_from_layer=n))


def test_per_part_learning_rates(dirs):
    model = build(dirs)
    stages.apply_stage(model, StageConfig(train_llm=True))
    cfg = Config(stage=StageConfig(train_llm=True))
    cfg.stage.lr.llm = 2e-5
    groups = stages.param_groups(model, cfg)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"connector": cfg.optim.lr, "llm": 2e-5}
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _optimizer(cfg: Config, params: list[torch.nn.Parameter]):
    from lvlm.train.engine import lr_lambda

    groups = [{"params": params[:1], "weight_decay": cfg.optim.weight_decay, "lr": cfg.optim.lr, "name": "c"},
              {"params": params[1:], "weight_decay": 0.0, "lr": cfg.optim.lr, "name": "c"}]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def test_a_loaded_checkpoint_keeps_this_configs_optimizer_hyperparameters():
    """Loading restores the checkpoint run's lr, weight decay, betas and eps into the optimizer groups; the
    engine puts this config's back (resume force: extending a finished cosine run trained at lr 0.0 and a
    changed weight decay was ignored). With an unchanged config the restored state stays bit-identical."""
    from lvlm.train.engine import CONFIG_HPARAMS, lr_lambda, reapply_config_hparams

    params = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))]
    old = load_config(None, ["--train.max_steps", "4", "--optim.lr", "1e-3", "--optim.schedule", "cosine"])
    opt, sched = _optimizer(old, params)
    for _ in range(4):
        params[0].grad, params[1].grad = torch.ones(3, 3), torch.ones(3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0                              # the old schedule's end
    saved = opt.state_dict(), sched.state_dict()

    same_opt, same_sched = _optimizer(old, params)                       # unchanged config: nothing moves
    fresh = [{k: g[k] for k in CONFIG_HPARAMS} for g in same_opt.param_groups]
    same_opt.load_state_dict(saved[0])
    same_sched.load_state_dict(saved[1])
    restored = [dict((k, v) for k, v in g.items() if k != "params") for g in same_opt.param_groups]
    reapply_config_hparams(same_opt, same_sched, fresh)
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in same_opt.param_groups] == restored
    assert same_sched.get_last_lr() == [0.0, 0.0]

    new = load_config(None, ["--train.max_steps", "8", "--optim.lr", "2e-3", "--optim.schedule", "cosine",
                             "--optim.weight_decay", "0.1", "--optim.beta2", "0.95", "--optim.eps", "1e-6"])
    new_opt, new_sched = _optimizer(new, params)
    fresh = [{k: g[k] for k in CONFIG_HPARAMS} for g in new_opt.param_groups]
    new_opt.load_state_dict(saved[0])
    new_sched.load_state_dict(saved[1])
    assert new_opt.param_groups[0]["lr"] == 0.0 and new_opt.param_groups[0]["weight_decay"] == old.optim.weight_decay
    reapply_config_hparams(new_opt, new_sched, fresh)
    want = 2e-3 * lr_lambda(new)(4)
    assert want > 0 and [g["lr"] for g in new_opt.param_groups] == [want, want] == new_sched.get_last_lr()
    assert [g["weight_decay"] for g in new_opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (new.optim.beta1, 0.95) and g["eps"] == 1e-6 for g in new_opt.param_groups)
    assert new_sched.last_epoch == 4 and new_opt.state[params[0]]["step"] == 4   # moments and step kept
    params[0].grad, params[1].grad = torch.ones(3, 3), torch.ones(3)
    new_opt.step()
    new_sched.step()
    assert new_sched.get_last_lr()[0] == pytest.approx(2e-3 * lr_lambda(new)(5))


def lora_stage(save="merged", r=4):
    return StageConfig(train_llm=True, lora=LoRAConfig(r=r, alpha=8, dropout=0.0, save=save))


def randomise_lora_b(model):
    with torch.no_grad():  # B starts at zero (LoRA's init): make the adapters do something
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)


def test_lora_trains_adapters_only_and_merge_equals_the_adapted_model(dirs, tmp_path):
    model = build(dirs)
    stage = lora_stage()
    lora.add_lora(model, stage)
    plan = stages.apply_stage(model, stage)
    llm_trainable = trainable(model.llm)
    assert llm_trainable and all(".lora_" in n for n in llm_trainable)
    assert all(p.requires_grad for p in model.connector.parameters())
    out = model(**batch(model))
    out.loss_sum.backward()
    stages.check_gradients(model, plan, lambda p: p.grad)
    randomise_lora_b(model)
    model.eval()
    with torch.no_grad():
        want = model(**batch(model)).logits
    # the saved, merged weights rebuild the same model without peft
    from lvlm.train.engine import stage_state_dict

    weights, adapters = stage_state_dict(model, zero3=False, merge_lora=True)
    assert not any(".lora_" in k or "base_layer" in k for k in weights)
    assert any(k.endswith("q_proj.weight") for k in weights) and adapters
    fresh = build(dirs)
    fresh.load_state_dict(weights, strict=False)
    fresh.eval()
    with torch.no_grad():
        got = fresh(**batch(fresh)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and merge_into_base (used when a stage starts from an adapter checkpoint) gives the same outputs
    merged_names = lora.merge_into_base(model)
    assert merged_names and not lora.lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(model)).logits, want, rtol=1e-5, atol=1e-5)


def test_lora_adapter_is_peft_format_and_reloads(dirs, tmp_path):
    from peft import PeftModel

    model = build(dirs)
    stage = lora_stage(save="adapter")
    lora.add_lora(model, stage)
    stages.apply_stage(model, stage)
    randomise_lora_b(model)
    model.eval()
    from lvlm.train.engine import stage_state_dict

    weights, adapters = stage_state_dict(model, zero3=False, merge_lora=False)
    assert not any("q_proj" in k for k in weights)  # the LLM's weights are not duplicated
    path = lora.save_adapter(tmp_path, adapters, stage, len(model.llm.decoder_layers()), dirs["llm"])
    # our loader: a fresh plain model + the adapter == the adapted model
    fresh = build(dirs)
    fresh.load_state_dict(weights, strict=False)
    assert lora.load_adapter(fresh, tmp_path)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch(fresh)).logits, model(**batch(model)).logits)
    # peft's loader puts the same adapter on the plain transformers LLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 6, 7, 8]])
    plain = AutoModelForCausalLM.from_pretrained(dirs["llm"]).eval()
    plain.resize_token_embeddings(model.llm.model.get_input_embeddings().num_embeddings)
    with torch.no_grad():
        plain.get_input_embeddings().weight.copy_(model.llm.model.get_input_embeddings().weight)
        plain.lm_head.weight.copy_(model.llm.model.lm_head.base_layer.weight if hasattr(
            model.llm.model.lm_head, "base_layer") else model.llm.model.lm_head.weight)
    peft_model = PeftModel.from_pretrained(plain, str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model.llm.model(input_ids=ids).logits)


def test_lora_errors_name_the_problem(dirs):
    model = build(dirs)
    bad = StageConfig(train_llm=True, lora=LoRAConfig(r=4, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="target_modules.*q_proj"):
        lora.add_lora(model, bad)


@pytest.mark.parametrize("args, match", [
    (["--stage.lora.r", "8"], "stage.train_llm is false"),
    (["--stage.llm_up_to_layer", "4"], "would have no effect"),
    (["--stage.vision_from_layer", "4"], "would have no effect"),
    (["--stage.train_moca", "true"], "model.moca is false"),
    (["--stage.train_llm", "true", "--stage.lora.r", "8", "--stage.lora.save", "both"], "merged, adapter|'merged'"),
    (["--stage.lr.llm", "-1"], "stage.lr.llm"),
])
def test_stage_keys_are_validated_at_load(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


# ------------------------------------------------------------------------------------------ pipelines


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_pipeline_merges_layers_and_chains_init_from(tmp_path):
    from lvlm.config.pipeline import is_pipeline, load_pipeline

    write(tmp_path / "base.yaml", """
        run_dir: runs/x
        optim: {lr: 1.0e-3, weight_decay: 0.1}
        data:
          source: {type: webdataset, shards: a.tar, caption_key: json_caption}
        """)
    pipe = write(tmp_path / "pipe.yaml", """
        base: base.yaml
        run_dir: runs/pipe
        train: {max_steps: 7}
        stages:
          align: {}
          sft:
            optim: {lr: 2.0e-5}
            stage: {train_llm: true, lora: {r: 8}}
            data:
              source: {type: llava_json, format: chat, json_path: c.json, image_folder: imgs}
        """)
    assert is_pipeline(pipe) and not is_pipeline(tmp_path / "base.yaml")
    p = load_pipeline(pipe, ["--train.micro_batch_size", "3", "--stages.sft.train.max_steps", "2"])
    (a_name, a), (s_name, s) = p.stages
    assert (a_name, s_name) == ("align", "sft") and str(p.run_dir) == "runs/pipe"
    assert a.run_dir == "runs/pipe/align" and s.run_dir == "runs/pipe/sft"
    assert a.stage.name == "align" and a.stage.init_from == "" and s.stage.init_from == "runs/pipe/align"
    assert a.optim.lr == 1e-3 and s.optim.lr == 2e-5 and s.optim.weight_decay == 0.1  # merged key by key
    assert a.train.max_steps == 7 and s.train.max_steps == 2  # per-stage CLI override
    assert a.train.micro_batch_size == 3 and s.train.micro_batch_size == 3  # every-stage CLI override
    assert s.stage.lora.r == 8 and s.stage.train_llm and not a.stage.train_llm
    assert type(s.data.source).__name__ == "LLaVAJsonSourceConfig" and s.data.source.format == "chat"
    assert a.data.source.caption_key == "json_caption"  # a typed node is replaced whole, not patched
    p2 = load_pipeline(pipe, ["--run_dir", str(tmp_path / "elsewhere")])
    assert p2.stages[1][1].stage.init_from == str(tmp_path / "elsewhere" / "align")


def test_pipeline_errors_name_the_stage(tmp_path):
    from lvlm.config.pipeline import load_pipeline

    pipe = write(tmp_path / "pipe.yaml", """
        stages:
          align: {}
          sft: {stage: {train_llm: false, lora: {r: 4}}}
        """)
    with pytest.raises(ConfigError, match="pipeline stage 'sft'.*train_llm is false"):
        load_pipeline(pipe)
    ok = write(tmp_path / "ok.yaml", "stages: {align: {}}\n")
    with pytest.raises(ConfigError, match="no stage 'sfx'.*align"):
        load_pipeline(ok, ["--stages.sfx.optim.lr", "1"])
    with pytest.raises(ConfigError, match="non-empty mapping"):
        load_pipeline(write(tmp_path / "empty.yaml", "stages: {}\n"))


def two_stage_pipeline(tmp_path: Path) -> tuple[Path, list[str], Callable]:
    """(pipe.yaml of stages align -> sft, the names of the stages run, a fake train that leaves the final
    checkpoint, its config and its COMPLETE marker as the loop does)."""
    import json
    import uuid

    from lvlm.config import dump_config
    from lvlm.train.checkpoint import COMPLETE, find_checkpoint, identity, tag_for

    pipe = write(tmp_path / "pipe.yaml", f"""
        run_dir: {tmp_path / 'runs'}
        train: {{max_steps: 2}}
        stages:
          align: {{}}
          sft:
            stage: {{train_llm: true}}
        """)
    ran: list[str] = []

    def fake_train(cfg):
        ckpt = Path(cfg.run_dir) / "checkpoints" / tag_for(cfg.train.max_steps)
        start = identity(find_checkpoint(cfg.stage.init_from)[1]) if cfg.stage.init_from else None
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "config.yaml").write_text(dump_config(cfg))
        marker = {"step": cfg.train.max_steps, "world_size": 1, "id": uuid.uuid4().hex}
        (ckpt / COMPLETE).write_text(json.dumps({**marker, **({"started_from": start} if start else {})}))
        ran.append(cfg.stage.name)
        return cfg.stage.name

    return pipe, ran, fake_train


def test_pipeline_refuses_a_stage_trained_from_another_start_than_it_has_now(tmp_path):
    """sft starts from align's weights: relaunching with align trained again (stage resume false now, or in an
    earlier launch that stopped before sft) must not skip sft as done, since its weights came from the
    superseded align; refused before any stage runs, naming the way out."""
    import json
    import uuid

    from lvlm.config.pipeline import load_pipeline
    from lvlm.train.checkpoint import COMPLETE, tag_for
    from lvlm.train.pipeline import run_pipeline

    pipe, ran, fake_train = two_stage_pipeline(tmp_path)
    assert run_pipeline(load_pipeline(pipe, []), fake_train) == ["align", "sft"]
    assert run_pipeline(load_pipeline(pipe, []), fake_train) == []              # both done, nothing stale
    with pytest.raises(ConfigError, match=r"stage 'sft': .*trained from stage 'align' .*which this launch trains "
                                          r"again.*--stages\.sft\.resume false"):
        run_pipeline(load_pipeline(pipe, ["--stages.align.resume", "false"]), fake_train)
    assert ran == ["align", "sft"]                                              # refused before any stage ran
    both = ["--stages.align.resume", "false", "--stages.sft.resume", "false"]
    assert run_pipeline(load_pipeline(pipe, both), fake_train) == ["align", "sft"]
    # align trained again by an earlier launch that stopped before sft: its marker's id no longer matches
    marker = tmp_path / "runs" / "align" / "checkpoints" / tag_for(2) / COMPLETE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "id": uuid.uuid4().hex}))
    with pytest.raises(ConfigError, match=r"(?s)stage 'sft': .*start point \(stage\.init_from\): trained from .*"
                                          r"now holds .*--stages\.sft\.resume false"):
        run_pipeline(load_pipeline(pipe, []), fake_train)


def test_resuming_a_single_stage_whose_start_was_retrained_is_refused(tmp_path):
    """`lvlm train --stage.init_from X` resumed after X was trained again would continue weights trained from
    the old X: refused like a config change (rundir.check_resume), `resume: force` continues and records it."""
    import json
    import uuid

    from lvlm.config.pipeline import load_pipeline
    from lvlm.train.checkpoint import COMPLETE, tag_for
    from lvlm.train.pipeline import run_pipeline
    from lvlm.train.rundir import check_resume

    pipe, _, fake_train = two_stage_pipeline(tmp_path)
    run_pipeline(load_pipeline(pipe, []), fake_train)
    sft = dict(load_pipeline(pipe, []).stages)["sft"]
    assert sft.stage.init_from and check_resume(Path(sft.run_dir), sft)[1] == []      # same start: resumable
    marker = tmp_path / "runs" / "align" / "checkpoints" / tag_for(2) / COMPLETE
    old_id = json.loads(marker.read_text())["id"]
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "id": uuid.uuid4().hex}))  # align retrained
    with pytest.raises(ConfigError, match=rf"(?s)start point \(stage\.init_from\): trained from .*id {old_id}.*"
                                          r"--resume force"):
        check_resume(Path(sft.run_dir), sft)
    sft.resume = "force"
    (change,) = check_resume(Path(sft.run_dir), sft)[1]
    assert change.startswith("start point (stage.init_from)")


def test_pipeline_refuses_a_finished_stage_whose_config_changed(tmp_path):
    """A relaunched pipeline skips finished stages; if a stage's config changed since, skipping would keep
    (and feed to the next stage) what another config trained, so it is refused before any stage runs."""
    from lvlm.config.pipeline import load_pipeline
    from lvlm.train.pipeline import run_pipeline

    pipe, ran, fake_train = two_stage_pipeline(tmp_path)
    assert run_pipeline(load_pipeline(pipe, []), fake_train) == ["align", "sft"]
    assert run_pipeline(load_pipeline(pipe, ["--mir.every", "0", "--train.log_every", "1"]), fake_train) == []
    with pytest.raises(ConfigError, match=r"stage 'sft'.*\n  optim.lr: 0.001 -> 1e-05"):
        run_pipeline(load_pipeline(pipe, ["--stages.sft.optim.lr", "1e-5"]), fake_train)
    assert ran == ["align", "sft"]  # refused before any stage ran
    again = load_pipeline(pipe, ["--stages.sft.optim.lr", "1e-5", "--resume", "false"])
    assert run_pipeline(again, fake_train) == ["align", "sft"]  # resume false: every stage again
