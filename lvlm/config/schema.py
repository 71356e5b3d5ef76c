"""The configuration schema: one dataclass per concern, choice registries for swappable parts.

Every field has a docstring; defaults describe the embedded default run (the synthetic
world, toy backbones, LLaVA stage 1 on CPU). Paths starting with ``toy://`` name assets of
the embedded default that ``lvlm.toy`` builds and caches on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import draccus

# ----------------------------------------------------------------------------------- vision


@dataclass
class VisionConfig(draccus.ChoiceRegistry):
    """A vision encoder; ``type`` picks the backend."""

    feature_layer: int = -2
    """Hidden-state index whose patch features feed the connector (-2 = penultimate, as LLaVA)."""
    keep_cls: bool = False
    """Keep the CLS/prefix token(s) in the features (LLaVA drops them)."""
    image_size: Optional[int] = None
    """Run at this resolution instead of the encoder's native one (positions are interpolated)."""
    resize: str = "auto"
    """How an image becomes the encoder's square input: auto (the backbone's own preprocessing: CLIP/EVA crop,
    SigLIP squash), crop (short side to size, centre crop), squash (both sides to size, aspect ratio lost),
    pad (pad to a square with the mean colour, then resize: LLaVA-1.5 SFT's / Bunny's image_aspect_ratio pad)."""


@VisionConfig.register_subclass("hf")
@dataclass
class HFVisionConfig(VisionConfig):
    """A transformers vision tower (CLIPVisionModel or SiglipVisionModel, chosen by config.model_type)."""

    name_or_path: str = ""
    """Local directory or hub id holding the model (a full CLIP/SigLIP checkpoint or a vision-only one)."""
    random_init: bool = False
    """Build from the checkpoint's config with random weights (no weights are read)."""


@VisionConfig.register_subclass("open_clip")
@dataclass
class OpenCLIPVisionConfig(VisionConfig):
    """An open_clip model's visual tower (CLIP, SigLIP, EVA ...)."""

    arch: str = "toy://vision/model_config.json"
    """open_clip architecture name (e.g. ViT-L-14-336, ViT-SO400M-14-SigLIP-384, EVA02-L-14-336)
    or the path of an open_clip model-config JSON file."""
    pretrained: str = "toy://vision/open_clip_model.safetensors"
    """open_clip pretrained tag or a local weights file; empty for random weights."""


# ------------------------------------------------------------------------------- connector


@dataclass
class ConnectorConfig(draccus.ChoiceRegistry):
    """Maps vision features [B, n, vision_dim] to LLM embeddings [B, m, llm_dim]."""


@ConnectorConfig.register_subclass("linear")
@dataclass
class LinearConnectorConfig(ConnectorConfig):
    """One linear projection (LLaVA-1)."""


@ConnectorConfig.register_subclass("mlp")
@dataclass
class MLPConnectorConfig(ConnectorConfig):
    """An MLP projector (LLaVA-1.5: depth 2, GELU)."""

    depth: int = 2
    """Number of linear layers (>= 1)."""
    activation: str = "gelu"
    """Activation between layers: gelu, relu, silu, tanh."""


@ConnectorConfig.register_subclass("avg_pool")
@dataclass
class AvgPoolConnectorConfig(ConnectorConfig):
    """MM1 average pooling: the patch grid is average-pooled (adaptive) to sqrt(tokens) x sqrt(tokens),
    then an MLP. Needs a square patch grid (model.vision.keep_cls false when the encoder has a CLS token)."""

    tokens: int = 64
    """Output tokens per image: a perfect square no larger than the patch count (64 = 8x8, 144 = 12x12)."""
    depth: int = 2
    """Linear layers of the MLP after pooling (>= 1; 1 = a linear projection as in MM1)."""
    activation: str = "gelu"
    """Activation between MLP layers: gelu, relu, silu, tanh."""


@ConnectorConfig.register_subclass("token_merge")
@dataclass
class TokenMergeConnectorConfig(ConnectorConfig):
    """VILA k x k token merge: the channels of each k x k block of neighbouring patches are concatenated
    (space-to-depth, k*k*vision_dim), layer-normed, then an MLP. Output tokens: ceil(side / k)^2; a grid
    side not divisible by k is zero-padded at the bottom/right, as VILA does. Needs a square patch grid."""

    kernel: int = 2
    """Block side k (>= 1): k*k neighbouring patches become one token (2 = VILA-1.5's 4x reduction)."""
    depth: int = 2
    """Linear layers of the MLP after merging (>= 1)."""
    activation: str = "gelu"
    """Activation between MLP layers: gelu, relu, silu, tanh."""


@ConnectorConfig.register_subclass("c_abstractor")
@dataclass
class CAbstractorConnectorConfig(ConnectorConfig):
    """Honeybee / MM1 C-Abstractor: residual conv blocks on the patch grid, adaptive average pooling to
    sqrt(tokens) x sqrt(tokens), more residual blocks, then a 2-layer SiLU readout MLP. Needs a square
    patch grid."""

    tokens: int = 64
    """Output tokens per image: a perfect square no larger than the patch count (64 = 8x8, 144 = 12x12)."""
    num_blocks: int = 3
    """Residual blocks before pooling and again after it (>= 1; Honeybee: 3)."""
    hidden_size: int = 0
    """Channels of the conv blocks (>= 0); 0 = the vision width (Honeybee: 1024 with CLIP ViT-L)."""


@ConnectorConfig.register_subclass("resampler")
@dataclass
class ResamplerConnectorConfig(ConnectorConfig):
    """Perceiver resampler / attention pooling (Flamingo; MM1 "attention pooling"): learned query tokens
    cross-attend to (features + queries), pre-norm, with an FFN, ``layers`` times; then a linear map
    to the LLM width. Output tokens = ``tokens``, whatever the input count."""

    tokens: int = 64
    """Output tokens per image (learned queries, >= 1)."""
    layers: int = 2
    """Cross-attention + FFN layers (>= 1)."""
    heads: int = 8
    """Attention heads; must divide the hidden size."""
    hidden_size: int = 0
    """Width of queries and attention (>= 0); 0 = the vision width (features are projected otherwise)."""


@ConnectorConfig.register_subclass("qformer")
@dataclass
class QFormerConnectorConfig(ConnectorConfig):
    """BLIP-2 Q-Former (transformers' Blip2QFormerModel, random init): learned query tokens self-attend
    and cross-attend to the vision features, then a linear map to the LLM width. Output tokens =
    ``tokens``, whatever the input count."""

    tokens: int = 32
    """Output tokens per image (learned queries, >= 1; BLIP-2: 32)."""
    layers: int = 2
    """Q-Former layers (>= 1; BLIP-2: 12)."""
    heads: int = 8
    """Attention heads; must divide hidden_size."""
    hidden_size: int = 768
    """Q-Former width (> 0; BLIP-2: 768); its FFN is 4x wider."""
    cross_attention_every: int = 1
    """Cross-attention to the vision features in every n-th layer (>= 1; BLIP-2: 2)."""


# ------------------------------------------------------------------------------------- LLM


@dataclass
class LLMConfig:
    """Any transformers AutoModelForCausalLM."""

    name_or_path: str = "toy://llm"
    """Local directory or hub id of the causal LM."""
    tokenizer: str = ""
    """Tokenizer directory or hub id; empty = same as name_or_path."""
    random_init: bool = False
    """Build from the checkpoint's config with random weights."""
    dtype: str = "float32"
    """Parameter dtype at load time: float32, bfloat16, float16."""
    attn_implementation: str = "sdpa"
    """Attention kernel: eager, sdpa, flash_attention_2."""
    image_token: str = "<image>"
    """Placeholder token added to the tokenizer; each image becomes this many copies of it."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint (off by default)."""


@dataclass
class ModelConfig:
    """Vision encoder -> connector -> LLM."""

    vision: VisionConfig = field(default_factory=OpenCLIPVisionConfig)
    connector: ConnectorConfig = field(default_factory=MLPConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    moca: bool = False
    """MoCa: learnable per-decoder-layer scale/shift on image tokens, trained with the connector."""


# ------------------------------------------------------------------------------------ data


LLAVA_FORMATS: tuple[str, ...] = ("plain", "chat")
INTERLEAVED_FORMATS: tuple[str, ...] = ("webdataset", "mmc4", "obelics")
IMAGE_POSITIONS: tuple[str, ...] = ("before", "after")
TEXT_FORMATS: tuple[str, ...] = ("jsonl", "webdataset", "parquet")


@dataclass
class SourceConfig(draccus.ChoiceRegistry):
    """A caption data source; ``type`` picks the format."""


@SourceConfig.register_subclass("webdataset")
@dataclass
class WebDatasetSourceConfig(SourceConfig):
    """img2dataset-layout shards: NNNNN.jpg with .txt and/or .json (caption field)."""

    shards: str = "toy://world/captions/train-{000000..000007}.tar"
    """Shard URLs/paths; brace expansion and '::' separated lists allowed."""
    caption_key: str = "txt"
    """Where the caption is: 'txt' for the .txt member, or a field name of the .json member."""


@SourceConfig.register_subclass("llava_json")
@dataclass
class LLaVAJsonSourceConfig(SourceConfig):
    """LLaVA-style JSON (blip_laion_cc_sbu_558k.json schema: id, image, conversations) + image folder."""

    json_path: str = ""
    image_folder: str = ""
    format: str = "plain"
    """plain: LLaVA stage-1 captions (gpt turns only, no prompt); chat: the whole conversation in the LLM's
    chat template, loss on the assistant turns only (SFT)."""


@SourceConfig.register_subclass("interleaved")
@dataclass
class InterleavedSourceConfig(SourceConfig):
    """Interleaved image-text documents ([text, image, text, ...]) from webdataset, MMC4 or OBELICS files."""

    format: str = "webdataset"
    """webdataset (document-layout tar shards: KEY.json + KEY.<member> images), mmc4 (jsonl) or obelics (parquet)."""
    files: str = ""
    """Shard/file paths; brace expansion and '::' separated lists allowed."""
    image_folder: str = ""
    """Folder holding the image files named by mmc4/obelics documents (unused for webdataset)."""
    image_position: str = "before"
    """mmc4 only: put each image before or after its matched sentence (before, after)."""
    max_images: int = 0
    """Most images kept per document; later ones are dropped, text kept (0 = no limit)."""


@SourceConfig.register_subclass("text")
@dataclass
class TextSourceConfig(SourceConfig):
    """Text-only documents from jsonl, webdataset (KEY.txt members) or parquet files."""

    format: str = "jsonl"
    """jsonl, webdataset or parquet."""
    files: str = ""
    """File/shard paths; brace expansion and '::' separated lists allowed."""
    field: str = "text"
    """jsonl field / parquet column holding the text (webdataset always reads KEY.txt)."""


@dataclass
class MixtureComponent:
    """One named source of a data mixture and its weight."""

    source: SourceConfig = field(default_factory=WebDatasetSourceConfig)
    weight: float = 1.0
    """Relative share of samples (or tokens, see data.mix_by); weights need not sum to 1; 0 leaves the
    source out (an ablation cell can drop a source of its base's mixture)."""


@dataclass
class DataConfig:
    """Where samples come from and how they become token sequences."""

    source: SourceConfig = field(default_factory=WebDatasetSourceConfig)
    """The single source, used when data.mixture is empty."""
    mixture: dict[str, MixtureComponent] = field(default_factory=dict)
    """Named sources with weights, mixed with exact ratios (replaces data.source when non-empty).
    In YAML a mapping name -> {weight, source}; on the command line --data.mixture.NAME.KEY value."""
    mix_by: str = "samples"
    """What the mixture weights count: samples, or tokens (every reader then tokenizes every sample)."""
    pack: bool = False
    """Pack samples into rows of data.max_length (attention stays inside each sample); a micro-batch is then
    train.micro_batch_size ROWS, filled in stream order."""
    max_skip_fraction: float = 0.5
    """Fail the run when more than this fraction of the samples read so far was skipped (1 = never)."""
    max_length: int = 128
    """Maximum sequence length in tokens, image tokens included; text is cut, images never are."""
    system_prompt: str = ""
    """System prompt of conversation samples (those with user turns). With a chat template: a system message
    (empty = the template's own default); without one, the LLaVA v1 prefix (empty = LLaVA's)."""
    shuffle_buffer: int = 256
    """Seeded sample shuffle buffer (0 = stream order)."""
    num_workers: int = 1
    """Data-loader worker processes per rank."""


# ------------------------------------------------------------------------ optimisation/train


@dataclass
class OptimConfig:
    """AdamW with warmup and a decay schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    """Fraction of train.max_steps spent in linear warmup."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear, constant."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters on the LLM (peft). Active when ``r`` > 0 and stage.train_llm is true: the LLM's own
    weights stay frozen and only the adapters train."""

    r: int = 0
    """Adapter rank (0 = no LoRA: stage.train_llm trains the LLM's weights themselves)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Names of the LLM's linear layers that get adapters (Llama/Qwen/Mistral naming by default)."""
    save: str = "merged"
    """merged: checkpoints' trained weights hold the LLM with the adapters merged in (what the next stage,
    MIR, evaluation and export load); adapter: the adapters are kept apart, in peft's format, under
    CHECKPOINT/lora_adapter/."""


@dataclass
class ModuleLR:
    """Learning rate per part (0 = optim.lr); the schedule multiplies each."""

    vision: float = 0.0
    connector: float = 0.0
    llm: float = 0.0
    moca: float = 0.0


@dataclass
class StageConfig:
    """Which modules train. The default is LLaVA stage 1: connector only."""

    name: str = "align"
    init_from: str = ""
    """Start from a previous stage: its run directory (newest complete checkpoint) or a checkpoint
    directory. Every weight it carries (trained there or carried into it) is loaded before training."""
    train_vision: bool = False
    vision_from_layer: int = 0
    """With train_vision: train encoder blocks k.. and what follows them only (0 = the whole encoder)."""
    train_connector: bool = True
    train_llm: bool = False
    llm_up_to_layer: int = 0
    """With train_llm: train decoder layers 0..k-1 only, embeddings and head frozen (0 = the whole LLM;
    the MIR paper's "first half" of Vicuna-7B is 16). With LoRA: adapters on those layers only."""
    train_moca: Optional[bool] = None
    """Train MoCa's scale/shift (model.moca); empty = with the connector."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lr: ModuleLR = field(default_factory=ModuleLR)
    """Per-part learning rates, e.g. connector 1e-3 with llm 2e-5."""


@dataclass
class TrainConfig:
    """Steps, batch shape, distribution and checkpointing."""

    max_steps: int = 300
    micro_batch_size: int = 16
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = micro * accum * world size)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2, 3."""
    precision: str = "fp32"
    """fp32 or bf16."""
    activation_checkpointing: bool = False
    """Recompute LLM decoder layers in backward."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    log_every: int = 10
    """Print a log line every N steps (metrics.jsonl gets every step)."""
    progress: bool = True
    """Show a progress bar on rank 0."""


LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")


@dataclass
class MIRConfig:
    """MIR (Modality Integration Rate) on a fixed probe set of images paired with unrelated texts."""

    every: int = 100
    """Compute MIR before training, every N steps and at the end (0 = never during training)."""
    num_samples: int = 100
    """Probe size N (the paper's default; stable from N >= 20)."""
    images: SourceConfig = field(default_factory=lambda: WebDatasetSourceConfig(
        shards="toy://world/captions/val-000000.tar"))
    """Where the probe images come from: any data source (``type`` webdataset, llava_json, interleaved, ...);
    each sample's first image (captions are ignored; samples without an image are passed over). A plain string
    is read as webdataset shards (``{type: webdataset, shards: STRING}``)."""
    texts: SourceConfig = field(default_factory=lambda: TextSourceConfig(files="toy://world/text/train.jsonl"))
    """Where the unrelated probe texts come from (the paper: CNN/DailyMail articles): any data source; a
    sample's non-empty text segments, joined by newlines. A plain string is read as a jsonl file with a
    ``text`` field (``{type: text, format: jsonl, files: STRING}``)."""
    seed: int = 0
    """Seeds which images and texts are drawn and how they are paired."""
    batch_size: int = 8
    max_length: int = 2048
    """Probe sequence length; texts are cut to fit, the image never is."""
    cross: str = "exact"
    """Cross term: exact (true Tr((Sv St)^1/2)) or paper-fast (Tr(Sv St), what the reference code computes)."""
    layers_per_pass: int = 0
    """LLM layers whose pooled rows one probe pass keeps (0 = auto: as many as fit in mir.memory_gb)."""
    memory_gb: float = 8.0
    """Memory budget for pooled probe rows when layers_per_pass is 0 (rows stay in the model's dtype)."""
    system_prompt: str = LLAVA_SYSTEM
    """System text before ``USER:`` when the tokenizer has no chat template (LLaVA v1 format); with a chat
    template, a system message when changed from this default (the default leaves the template's own)."""


@dataclass
class TrackConfig:
    """Metrics sinks besides RUN_DIR/metrics.jsonl (always written). Nothing is hard-coded: no entity,
    project or path unless given here."""

    tensorboard: bool = False
    """Write tensorboard event files to RUN_DIR/tensorboard (needs the [tracking] extra)."""
    wandb: bool = False
    """Log to Weights & Biases (needs the [tracking] extra); files go under RUN_DIR/wandb."""
    wandb_project: str = ""
    """W&B project (required when track.wandb is true)."""
    wandb_entity: str = ""
    """W&B entity (team or user); empty = your default entity."""
    wandb_mode: str = "offline"
    """online, offline (no network needed; `wandb sync` later) or disabled."""
    run_name: str = ""
    """Run name shown by the trackers (empty = the run_dir's name)."""


@dataclass
class Config:
    """One training run."""

    run_dir: str = "runs/toy-stage1"
    """Output directory: resolved config, environment, DeepSpeed JSON, metrics, checkpoints."""
    seed: int = 0
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run_dir when there is one (so relaunching a
    preempted run's command resumes it), refused before any work if the config differs from the one that
    checkpoint was trained with (except track, mir, run_dir, resume, data.num_workers and the
    train.save_every/keep_last/log_every/progress/activation_checkpointing keys); true: the same, and say
    so when there is none; force: continue even under a changed config (the differences are recorded in
    env.json); false: start fresh, moving an earlier run's files in run_dir to run_dir/superseded/<time>/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    mir: MIRConfig = field(default_factory=MIRConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
