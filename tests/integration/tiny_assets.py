"""Tiny on-disk assets for end-to-end training tests: a small synthetic world (the real generator),
a word-level tokenizer built locally, a random tiny Llama and a random tiny HF CLIP vision tower,
all saved with the real saving formats and loaded back by path through the real loaders."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lvlm.toy.scene import vocabulary
from lvlm.toy.world import write_world

N_TRAIN, SHARD_SIZE = 384, 96


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
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(root / "vision")
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


def as_args(overrides: dict[str, str]) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
