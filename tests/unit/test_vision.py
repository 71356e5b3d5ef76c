"""Vision encoder backends: tiny random checkpoints saved in their real formats, loaded back by path.

Covers both backends (transformers CLIP/SigLIP; open_clip native CLIP ViT, timm SigLIP, timm
EVA02): output shapes and token counts at two resolutions, features equal to the original
model's hidden states (so the saved weights were loaded), feature-layer semantics, random
init, normalisation, clear errors, and the real-size architectures' contract values.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from lvlm.config.schema import HFVisionConfig, OpenCLIPVisionConfig, VisionConfig
from lvlm.models.vision import VisionEncoder, build_vision
from lvlm.models.vision.open_clip import OpenCLIPVisionEncoder

try:
    import vision_fixtures as vf
except ImportError:  # tests/unit became a package
    from tests.unit import vision_fixtures as vf

OPENAI_MEAN = open_clip.OPENAI_DATASET_MEAN


def _x(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def _features(enc: VisionEncoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc.eval()(x)


# ------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    kinds = ("clip", "clip_vision", "siglip", "siglip_vision")
    return {k: (root / k, vf.save_hf(k, root / k)) for k in kinds}


@pytest.mark.parametrize("kind", ["clip", "clip_vision", "siglip", "siglip_vision"])
def test_hf_features_equal_original_hidden_states(hf_ckpts, kind):
    path, tower = hf_ckpts[kind]
    prefix = 1 if kind.startswith("clip") else 0
    x = _x(vf.HF_SIZE)
    ref = vf.hf_hidden_states(tower, x)  # HF_LAYERS + 1 states [B, P + N, D]
    enc = build_vision(HFVisionConfig(name_or_path=str(path)))
    assert (enc.embed_dim, enc.patch_size, enc.image_size, enc.num_prefix_tokens) == (32, 14, 56, prefix)
    assert enc.num_tokens() == 16 and enc.num_tokens(112) == 64
    assert enc.layer_cls.__name__ == ("CLIPEncoderLayer" if prefix else "SiglipEncoderLayer")
    assert enc.num_layers == vf.HF_LAYERS - 1 and enc.source_num_layers == vf.HF_LAYERS  # truncated after -2
    out = _features(enc, x)
    assert out.shape == (2, enc.num_tokens(), 32)
    torch.testing.assert_close(out, ref[-2][:, prefix:])
    last = _features(build_vision(HFVisionConfig(name_or_path=str(path), feature_layer=-1, keep_cls=bool(prefix))), x)
    assert last.shape == (2, 16 + prefix, 32)
    torch.testing.assert_close(last, ref[-1])
    assert not torch.allclose(last[:, prefix:], out)
    emb = _features(build_vision(HFVisionConfig(name_or_path=str(path), feature_layer=0)), x)
    torch.testing.assert_close(emb, ref[0][:, prefix:])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_resolution_override(hf_ckpts, kind):
    path, tower = hf_ckpts[kind]
    prefix = 1 if kind == "clip" else 0
    enc = build_vision(HFVisionConfig(name_or_path=str(path), image_size=112, keep_cls=bool(prefix)))
    assert enc.image_size == 112 and enc.num_tokens() == 64 + prefix
    x = _x(112)
    out = _features(enc, x)
    assert out.shape == (2, 64 + prefix, 32)
    torch.testing.assert_close(out, vf.hf_hidden_states(tower, x)[-2])


def test_hf_mean_std_from_preprocessor_config_and_defaults(hf_ckpts, tmp_path):
    clip = build_vision(HFVisionConfig(name_or_path=str(hf_ckpts["clip_vision"][0])))
    siglip = build_vision(HFVisionConfig(name_or_path=str(hf_ckpts["siglip"][0])))
    assert clip.mean == pytest.approx(OPENAI_MEAN) and siglip.std == pytest.approx((0.5, 0.5, 0.5))
    path = tmp_path / "with_pp"
    vf.save_hf("clip_vision", path)
    pp = '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.25, 0.5]}'
    (path / "preprocessor_config.json").write_text(pp)
    enc = build_vision(HFVisionConfig(name_or_path=str(path)))
    assert enc.mean == pytest.approx((0.1, 0.2, 0.3)) and enc.std == pytest.approx((0.5, 0.25, 0.5))
    px = enc.image_transform()(Image.new("RGB", (80, 60), (255, 0, 51)))  # 51/255 = 0.2
    assert px.shape == (3, 56, 56)
    expected = torch.tensor([(1 - 0.1) / 0.5, (0 - 0.2) / 0.25, (0.2 - 0.3) / 0.5])
    torch.testing.assert_close(px[:, 10, 10], expected)


def test_hf_random_init_reads_no_weights(hf_ckpts, tmp_path):
    config_only = tmp_path / "config_only"
    vf.save_hf("siglip", tmp_path / "full")
    from transformers import AutoConfig
    AutoConfig.from_pretrained(tmp_path / "full").save_pretrained(config_only)
    with pytest.raises(FileNotFoundError, match="random_init"):
        build_vision(HFVisionConfig(name_or_path=str(config_only)))
    enc = build_vision(HFVisionConfig(name_or_path=str(config_only), random_init=True))
    out = _features(enc, _x(56))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    loaded = _features(build_vision(HFVisionConfig(name_or_path=str(tmp_path / "full"))), _x(56))
    assert not torch.allclose(out, loaded)


def test_hf_errors(hf_ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        build_vision(HFVisionConfig(name_or_path=str(tmp_path / "no_such_dir")))
    from transformers import ViTConfig
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"'vit'.*clip, clip_vision_model, siglip, siglip_vision_model"):
        build_vision(HFVisionConfig(name_or_path=str(tmp_path / "vit")))
    with pytest.raises(ValueError, match=r"feature_layer=-5 .*-4\.\.3"):
        build_vision(HFVisionConfig(name_or_path=str(hf_ckpts["clip"][0]), feature_layer=-5))
    with pytest.raises(ValueError, match="toy"):
        build_vision(HFVisionConfig(name_or_path="toy://vision/hf"))


# ----------------------------------------------------------------------------------- open_clip

FAMILIES = {  # family: (native size, prefix tokens, embed dim, layers, block class, arch file)
    "clip": (56, 1, 32, 3, "ResidualAttentionBlock", "model_config.json"),
    "siglip": (56, 0, 32, 3, "Block", "open_clip_config.json"),
    "eva": (112, 1, 192, 12, "EvaBlock", ""),  # arch = the directory holding open_clip_config.json
}


@pytest.fixture(scope="module")
def oc_ckpts(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("open_clip")
    return {f: (root / f, vf.save_open_clip(f, root / f)) for f in FAMILIES}


def _oc_cfg(path: Path, family: str, **kw) -> OpenCLIPVisionConfig:
    arch = str(path / FAMILIES[family][5]) if FAMILIES[family][5] else str(path)
    return OpenCLIPVisionConfig(arch=arch, pretrained=str(path / "open_clip_model.safetensors"), **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_open_clip_features_equal_original_hidden_states(oc_ckpts, family):
    path, model = oc_ckpts[family]
    size, prefix, dim, layers, block, _ = FAMILIES[family]
    x = _x(size)
    ref = vf.open_clip_hidden_states(model, x)  # layers + 1 states [B, P + N, D]
    assert len(ref) == layers + 1
    enc = build_vision(_oc_cfg(path, family))
    n = (size // 14) ** 2
    assert (enc.embed_dim, enc.patch_size, enc.image_size, enc.num_prefix_tokens) == (dim, 14, size, prefix)
    assert enc.num_tokens() == n and enc.layer_cls.__name__ == block
    assert enc.num_layers == layers - 1 and enc.source_num_layers == layers
    out = _features(enc, x)
    assert out.shape == (2, n, dim)
    torch.testing.assert_close(out, ref[-2][:, prefix:])
    last = _features(build_vision(_oc_cfg(path, family, feature_layer=-1, keep_cls=bool(prefix))), x)
    assert last.shape == (2, n + prefix, dim)
    torch.testing.assert_close(last, ref[-1])
    assert not torch.allclose(last[:, prefix:], out)
    emb = _features(build_vision(_oc_cfg(path, family, feature_layer=0)), x)
    torch.testing.assert_close(emb, ref[0][:, prefix:])


@pytest.mark.parametrize("family,size", [("clip", 112), ("siglip", 84), ("eva", 56)])
def test_open_clip_resolution_override(oc_ckpts, family, size):
    path, _ = oc_ckpts[family]
    prefix, dim = FAMILIES[family][1], FAMILIES[family][2]
    enc = build_vision(_oc_cfg(path, family, image_size=size, keep_cls=bool(prefix)))
    n = (size // 14) ** 2
    assert enc.image_size == size and enc.num_tokens() == n + prefix and enc.num_tokens(56) == 16 + prefix
    x = _x(size)
    out = _features(enc, x)
    assert out.shape == (2, n + prefix, dim)
    # open_clip's own factory resizes the positions of the saved checkpoint independently
    ref_model = open_clip.create_model(f"local-dir:{path}", force_image_size=size).eval()
    torch.testing.assert_close(out, vf.open_clip_hidden_states(ref_model, x)[-2])


def test_open_clip_state_dict_layouts(oc_ckpts, tmp_path):
    path, model = oc_ckpts["clip"]
    arch = str(path / "model_config.json")
    visual = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    torch.save(visual, tmp_path / "visual_prefixed.pt")
    torch.save({k[len("visual."):]: v for k, v in visual.items()}, tmp_path / "visual_bare.bin")
    x = _x(56)
    expected = vf.open_clip_hidden_states(model, x)[-2][:, 1:]
    for name in ("visual_prefixed.pt", "visual_bare.bin"):
        enc = build_vision(OpenCLIPVisionConfig(arch=arch, pretrained=str(tmp_path / name)))
        torch.testing.assert_close(_features(enc, x), expected)


def test_open_clip_random_init(oc_ckpts):
    path, model = oc_ckpts["siglip"]
    enc = build_vision(OpenCLIPVisionConfig(arch=str(path / "model_config.json"), pretrained=""))
    out = _features(enc, _x(56))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    assert not torch.allclose(out, vf.open_clip_hidden_states(model, _x(56))[-2])


def test_open_clip_mean_std_and_transform(oc_ckpts):
    clip = build_vision(_oc_cfg(oc_ckpts["clip"][0], "clip"))
    siglip = build_vision(_oc_cfg(oc_ckpts["siglip"][0], "siglip"))
    assert clip.mean == pytest.approx(OPENAI_MEAN) and clip.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert siglip.mean == pytest.approx((0.5,) * 3) and siglip.std == pytest.approx((0.5,) * 3)
    px = siglip.image_transform()(Image.new("RGB", (100, 70), (255, 0, 51)))
    assert px.shape == (3, 56, 56)
    torch.testing.assert_close(px[:, 30, 30], torch.tensor([1.0, -1.0, (0.2 - 0.5) / 0.5]))


def test_open_clip_bare_model_config_gets_its_familys_preprocessing(oc_ckpts):
    """A model-config JSON without preprocess_cfg (open_clip's model_configs/*.json schema): a copy of a
    built-in arch's config takes that arch's tags' mean/std/resize; another SigLIP config SigLIP's (0.5 mean
    and std, squash: it got OpenAI's mean/std and a centre crop); anything else OpenAI's and a crop."""
    from lvlm.models.vision.open_clip import _Arch, _mean_std, _resize

    siglip = build_vision(OpenCLIPVisionConfig(arch=str(oc_ckpts["siglip"][0] / "model_config.json"), pretrained=""))
    assert siglip.mean == pytest.approx((0.5,) * 3) and siglip.std == pytest.approx((0.5,) * 3)
    assert siglip.resize == "squash"
    clip = build_vision(_oc_cfg(oc_ckpts["clip"][0], "clip"))                    # model_config.json, no tags
    assert clip.mean == pytest.approx(OPENAI_MEAN) and clip.resize == "crop"
    for name in ("ViT-B-16-SigLIP", "ViT-B-16-quickgelu", "MobileCLIP-S1"):     # without building them
        named, copied = _Arch(name, open_clip.get_model_config(name)), _Arch(None, open_clip.get_model_config(name))
        assert (_mean_std(copied, {}), _resize(copied, {})) == (_mean_std(named, {}), _resize(named, {})), name
    assert _mean_std(_Arch(None, open_clip.get_model_config("MobileCLIP-S1")), {})[0] == (0.0, 0.0, 0.0)


def test_keep_cls_on_a_tower_without_cls_is_refused(oc_ckpts, tmp_path):
    """SigLIP has no CLS token: keep_cls would change nothing (the token count stayed the same), so it is refused,
    HF and open_clip alike; CLIP keeps its CLS token (one more feature token)."""
    vf.save_hf("siglip", tmp_path / "siglip")
    with pytest.raises(ValueError, match="keep_cls is true but this tower puts no CLS"):
        build_vision(HFVisionConfig(name_or_path=str(tmp_path / "siglip"), keep_cls=True, random_init=True))
    with pytest.raises(ValueError, match="keep_cls is true but this tower puts no CLS"):
        build_vision(_oc_cfg(oc_ckpts["siglip"][0], "siglip", keep_cls=True))
    clip = build_vision(_oc_cfg(oc_ckpts["clip"][0], "clip", keep_cls=True))
    assert clip.num_tokens() == build_vision(_oc_cfg(oc_ckpts["clip"][0], "clip")).num_tokens() + 1


def test_open_clip_errors(oc_ckpts, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown open_clip arch 'ViT-L-14-33'.*ViT-L-14-336"):
        OpenCLIPVisionEncoder.describe("ViT-L-14-33")
    with pytest.raises(ValueError, match="unsupported open_clip vision tower ModifiedResNet"):
        OpenCLIPVisionEncoder.describe("RN50")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_vision(OpenCLIPVisionConfig(arch=str(tmp_path / "missing.json"), pretrained=""))
    clip_arch = str(oc_ckpts["clip"][0] / "model_config.json")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_vision(OpenCLIPVisionConfig(arch=clip_arch, pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ValueError, match="do not fit"):  # SigLIP weights into the CLIP arch
        siglip_weights = str(oc_ckpts["siglip"][0] / "open_clip_model.safetensors")
        build_vision(OpenCLIPVisionConfig(arch=clip_arch, pretrained=siglip_weights))
    with pytest.raises(ValueError, match="valid tags: openai"):
        build_vision(OpenCLIPVisionConfig(arch="ViT-L-14-336", pretrained="no_such_tag"))
    with pytest.raises(ValueError, match="toy"):
        build_vision(OpenCLIPVisionConfig())  # the unresolved embedded default

    def offline(*_a, **_k):
        raise OSError("no network")
    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="could not be found locally.*local file"):
        build_vision(OpenCLIPVisionConfig(arch="ViT-L-14-336", pretrained="openai"))


@pytest.mark.parametrize("arch,dim,size,prefix,tokens", [
    ("ViT-L-14-336", 1024, 336, 1, 576),
    ("ViT-SO400M-14-SigLIP-384", 1152, 384, 0, 729),
    ("EVA02-L-14-336", 1024, 336, 1, 576),
])
def test_real_arch_contract_values(arch, dim, size, prefix, tokens):
    assert open_clip.get_model_config(arch) is not None
    info = OpenCLIPVisionEncoder.describe(arch)
    assert (info.embed_dim, info.image_size, info.patch_size) == (dim, size, 14)
    assert info.num_prefix_tokens == prefix
    assert info.num_tokens() == tokens and info.num_tokens(keep_cls=True) == tokens + prefix


def test_describe_matches_built_encoder(oc_ckpts):
    path, _ = oc_ckpts["eva"]
    info = OpenCLIPVisionEncoder.describe(str(path))
    enc = build_vision(OpenCLIPVisionConfig(arch=str(path), pretrained="", feature_layer=-1))
    assert (info.embed_dim, info.image_size, info.patch_size, info.num_prefix_tokens, info.num_layers) == (
        enc.embed_dim, enc.image_size, enc.patch_size, enc.num_prefix_tokens, enc.num_layers)
    assert info.layer_cls is enc.layer_cls


@pytest.mark.parametrize("family,layer", [("clip", 0), ("siglip", -2), ("eva", 0)])
def test_every_kept_parameter_gets_a_gradient(oc_ckpts, hf_ckpts, family, layer):
    """Pruning leaves no unused parameters (DDP/ZeRO need none when the tower trains)."""
    path, _ = oc_ckpts[family]
    hf_path = str(hf_ckpts["siglip" if family == "siglip" else "clip"][0])
    encoders = [build_vision(OpenCLIPVisionConfig(arch=str(path), pretrained="", feature_layer=layer)),
                build_vision(HFVisionConfig(name_or_path=hf_path, feature_layer=layer))]
    for enc in encoders:
        enc.train()(_x(enc.image_size)).square().mean().backward()
        assert [n for n, p in enc.named_parameters() if p.grad is None] == []


def test_build_vision_rejects_unknown_config_type():
    with pytest.raises(TypeError, match="HFVisionConfig.*OpenCLIPVisionConfig"):
        build_vision(VisionConfig())


@pytest.mark.parametrize("mode", ["crop", "squash", "pad"])
def test_fast_image_transform_matches_torchvision_composition(mode):
    """One box resize + fused normalisation == the composed torchvision steps of each resize mode (crop:
    Resize(short side) -> CenterCrop; squash: Resize((s, s)); pad: expand to square -> Resize), to within one
    grey level, for portrait, landscape, square, up- and down-scaled images; picklable."""
    import pickle

    import numpy as np
    from PIL import Image

    from lvlm.models.vision.base import ResizeCropNormalize

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    fast = ResizeCropNormalize(56, mean, std, mode)
    enc = type("E", (), {"image_size": 56, "mean": mean, "std": std, "resize": mode})
    from lvlm.models.vision.base import VisionEncoder

    reference = VisionEncoder.reference_transform(enc)
    rng = np.random.default_rng(0)
    grey = torch.tensor(std).view(3, 1, 1) * 255
    for w, h in [(128, 96), (96, 128), (70, 70), (30, 20), (200, 57), (57, 190)]:
        base = rng.normal(size=(h // 4 + 1, w // 4 + 1, 3))
        arr = np.kron(base, np.ones((4, 4, 1)))[:h, :w] * 40 + 128 + rng.normal(0, 8, (h, w, 3))
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        a, b = fast(image), reference(image)
        assert a.shape == b.shape == (3, 56, 56) and a.dtype == torch.float32
        assert float(((a - b).abs() * grey).max()) <= 1.01, (w, h)
        assert float((a - b).abs().mean()) < 1e-3
    assert torch.equal(pickle.loads(pickle.dumps(fast))(image), fast(image))
    assert fast(image.convert("L")).shape == (3, 56, 56)                # non-RGB input converted


def _quarter_red(width: int = 112, height: int = 56) -> Image.Image:
    """A wide image whose left quarter is red and the rest blue: a centre crop loses every red pixel."""
    import numpy as np

    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 4] = (255, 0, 0)
    pixels[:, width // 4:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_resize_auto_follows_the_backbones_own_preprocessing(tmp_path):
    """auto: SigLIP squashes the whole image to a square as its own processors do (HF SiglipImageProcessor,
    open_clip's resize_mode squash), CLIP centre-crops as CLIPImageProcessor does; an explicit mode wins."""
    import json

    from transformers import CLIPImageProcessor, SiglipImageProcessor

    image = _quarter_red()
    vf.save_hf("siglip", tmp_path / "siglip")
    siglip = build_vision(HFVisionConfig(name_or_path=str(tmp_path / "siglip"), random_init=True))
    assert siglip.resize == "squash"                                   # the family default, no processor file
    SiglipImageProcessor(size={"height": siglip.image_size, "width": siglip.image_size}).save_pretrained(
        tmp_path / "siglip")
    siglip = build_vision(HFVisionConfig(name_or_path=str(tmp_path / "siglip")))
    want = SiglipImageProcessor.from_pretrained(tmp_path / "siglip")(image, return_tensors="pt").pixel_values[0]
    got = siglip.image_transform()(image)
    assert (got[0] > 0).float().mean() == pytest.approx(0.25, abs=0.03)  # the red quarter is kept
    assert (got - want).abs().max() < 0.05
    vf.save_hf("clip", tmp_path / "clip")
    size = build_vision(HFVisionConfig(name_or_path=str(tmp_path / "clip"), random_init=True)).image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        tmp_path / "clip")
    clip = build_vision(HFVisionConfig(name_or_path=str(tmp_path / "clip")))
    want = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(image, return_tensors="pt").pixel_values[0]
    assert clip.resize == "crop" and (clip.image_transform()(image) - want).abs().max() < 0.05
    padded = build_vision(HFVisionConfig(name_or_path=str(tmp_path / "clip"), resize="pad")).image_transform()(image)
    assert padded[:, 0].abs().max() < 0.02 and padded[:, -1].abs().max() < 0.02  # mean-colour rows: 0 once normalised
    assert (padded[0] > 1.0).float().mean() == pytest.approx(0.125, abs=0.03)    # all red kept, in half the height

    vf.register_tiny_siglip()
    oc = tmp_path / "oc_siglip"
    vf.save_open_clip("siglip", oc)
    cfg = json.loads((oc / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"] = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    (oc / "open_clip_config.json").write_text(json.dumps(cfg))
    enc = build_vision(OpenCLIPVisionConfig(arch=str(oc), pretrained=str(oc / "open_clip_model.safetensors")))
    _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{oc}")
    assert enc.resize == "squash" and (enc.image_transform()(image) - theirs(image)).abs().max() < 0.05
    cropped = build_vision(OpenCLIPVisionConfig(arch=str(oc), pretrained=str(oc / "open_clip_model.safetensors"),
                                                resize="crop"))
    assert cropped.resize == "crop" and (cropped.image_transform()(image)[0] > 0).float().mean() == 0.0

