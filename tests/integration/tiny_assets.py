"""Tiny on-disk assets for end-to-end training tests: a small synthetic world (the real generator),
a word-level tokenizer built locally, a random tiny Llama and a random tiny HF CLIP vision tower,
all saved with the real saving formats and loaded back by path through the real loaders.

The assets are a pure function of the code and the seeds (weights drawn by `seeded_init`, not by the
installed transformers' own init), so a run on them can be compared with a stored golden file;
`assets_digest` fingerprints them, to tell a changed input from a changed training path."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lvlm.toy.scene import vocabulary
from lvlm.toy.world import write_world

N_TRAIN, SHARD_SIZE = 384, 96
INIT_STD = 0.02


def seeded_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter from one seeded generator, in parameter-name order: 1-D `weight`s
    (norm gains) 1, `bias`es 0, everything else (matrices, embeddings, patch conv, class embedding)
    N(0, INIT_STD). Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif leaf == "weight" and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
    return model


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok.train_from_iterator([" ".join(vocabulary())], trainer=trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def make_tiny_assets(root: Path) -> dict[str, str]:
    """Writes world/, llm/ and vision/ under root; returns CLI overrides pointing at them."""
    world = root / "world"
    write_world(world, seed=0, n_train=N_TRAIN, n_val=16, shard_size=SHARD_SIZE, n_text=8, image_size=32)
    tokenizer = build_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, tie_word_embeddings=False,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    seeded_init(llm, seed=1).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    seeded_init(vision, seed=2).save_pretrained(root / "vision")
    last = N_TRAIN // SHARD_SIZE - 1
    return {
        "model.vision.type": "hf",
        "model.vision.name_or_path": str(root / "vision"),
        "model.llm.name_or_path": str(root / "llm"),
        "data.source.shards": str(world / "captions" / f"train-{{000000..{last:06d}}}.tar"),
        "data.max_length": "48",
        "mir.images": str(world / "captions" / "val-000000.tar"),
        "mir.texts": str(world / "text" / "train.jsonl"),
        "mir.num_samples": "8",
        "mir.every": "6",
        "mir.max_length": "96",
    }


def assets_digest(root: Path) -> str:
    """sha256 of what the tiny assets feed a run: every weight tensor (name, dtype, shape, values), the
    tokenizer's vocabulary, every caption-shard member's bytes and the text corpus. File metadata that
    varies with the installed versions (config.json's transformers_version, tar mtimes) is left out."""
    h = hashlib.sha256()
    for path in sorted(root.glob("*/*.safetensors")):
        for name, t in sorted(load_file(path).items()):
            h.update(f"{path.parent.name}/{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    vocab = json.loads((root / "llm" / "tokenizer.json").read_text())["model"]["vocab"]
    h.update(json.dumps(vocab, sort_keys=True).encode())
    for shard in sorted((root / "world" / "captions").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                h.update(f"{shard.name}/{member.name}".encode())
                h.update(tar.extractfile(member).read())
    h.update((root / "world" / "text" / "train.jsonl").read_bytes())
    return h.hexdigest()


def as_args(overrides: dict[str, str]) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
