"""Model-backed rewards on tiny models built from configs and saved in the real on-disk formats (offline)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from reward_models import (  # noqa: E402
    AestheticMLP,
    ImageTransform,
    RewardConfigError,
    RewardWeightsNotFoundError,
    clear_backbone_cache,
    load_reward,
    save_open_clip,
)
from reward_models.preprocess import transform_from_hf_processor, transform_from_open_clip  # noqa: E402
from reward_models.testing import build_clip_tokenizer, build_tiny_open_clip, save_tiny_hf_clip  # noqa: E402

RED, GREEN = (0.9, 0.1, 0.1), (0.1, 0.8, 0.1)
PROMPTS = ["a red image", "a green image"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    yield
    torch.set_num_threads(old)
    clear_backbone_cache()


def colour_images(n_per_colour=1, size=32, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([RED] * n_per_colour + [GREEN] * n_per_colour).view(-1, 3, 1, 1)
    return (base + noise * torch.randn(base.shape[0], 3, size, size, generator=g)).clamp(0, 1)


def test_image(h=61, w=83, seed=0):
    """A uint8 test image with smooth structure and noise, as PIL and as a float tensor [1, 3, H, W]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(np.sin(xx / 5 + c) * 0.5 + 0.5) * (yy / h) for c in range(3)], -1) * 255
    arr = (arr + rng.normal(0, 20, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).float().div(255)[None]


test_image.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    model, cfg = build_tiny_open_clip(seed=0)
    return save_open_clip(model, cfg, tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def trained_clip_dir(tmp_path_factory):
    """A tiny CLIP (seed 27: ranks both colours the wrong way round before training) trained on two captions."""
    model, cfg = build_tiny_open_clip(seed=27)
    tokens = open_clip.SimpleTokenizer(context_length=16)(PROMPTS)
    transform = transform_from_open_clip(model)
    untrained = _similarity(model, transform, tokens)
    assert untrained[0, 0] < untrained[1, 0] and untrained[1, 1] < untrained[0, 1]
    model.token_embedding.requires_grad_(False)  # 49408 x 32 table: leave it fixed, train everything else
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(15):
        images = colour_images(noise=0.1, seed=step)
        img = F.normalize(model.encode_image(transform(images)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        labels = torch.arange(2)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_open_clip(model, cfg, tmp_path_factory.mktemp("trained_clip"))


def _similarity(model, transform, tokens):
    with torch.no_grad():
        img = F.normalize(model.encode_image(transform(colour_images())), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
    return 100 * img @ txt.T  # rows: red, green image; columns: red, green prompt


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    return save_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"), seed=0)


# ----------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [32, 224])
def test_preprocessing_matches_open_clip_transform(size):
    pil, x = test_image()
    reference = open_clip.image_transform(size, is_train=False)(pil)[None]
    ours = ImageTransform(size=size)(x)
    diff = (ours - reference).abs()
    assert ours.shape == reference.shape == (1, 3, size, size)
    # PIL rounds to 8 bits after each resampling pass (and Pillow >= 13 picks the pass order by aspect ratio):
    # a few 1/255 steps at most on this noisy image, i.e. <0.06 after dividing by std ~0.27
    assert diff.max() < 0.06 and diff.mean() < 0.006
    # the check can fail: bilinear resampling or another crop rounding is clearly off
    assert (ImageTransform(size=size, interpolation="bilinear")(x) - reference).abs().mean() > 0.01
    assert (ImageTransform(size=32, crop_rounding="floor")(x) - open_clip.image_transform(32, False)(pil)).abs().mean() > 0.1


def test_preprocessing_of_saved_model_matches_its_own_transform(tiny_clip_dir):
    model, _, preprocess_val = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    for h, w in [(61, 83), (90, 40), (32, 32)]:
        pil, x = test_image(h, w, seed=h)
        ours = transform_from_open_clip(model)(x)
        diff = (ours - preprocess_val(pil)[None]).abs()
        assert diff.max() < 0.06 and diff.mean() < 0.006


@pytest.mark.parametrize("size", [32, 224])
def test_preprocessing_matches_clip_image_processor(size):
    from transformers import CLIPImageProcessor

    pil, x = test_image()
    processors = [CLIPImageProcessor]
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processors.append(CLIPImageProcessorPil)
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL one
        pass
    for cls in processors:
        proc = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        reference = proc(images=pil, return_tensors="pt")["pixel_values"]
        ours = transform_from_hf_processor(proc)(x)
        assert ours.shape == reference.shape
        diff = (ours - reference).abs()
        assert diff.max() < 0.06 and diff.mean() < 0.006, cls.__name__


# ----------------------------------------------------------------------------------------------- clip_score


def test_clip_score_from_saved_dir_matches_open_clip_reference(tiny_clip_dir):
    pil_images = [test_image(48, 40, seed=s)[0] for s in range(3)]
    x = torch.cat([test_image(48, 40, seed=s)[1] for s in range(3)])
    prompts = ["a photo of a cat", "red", "a blue square on grass"]
    r = load_reward("clip_score", device="cpu", clip_model=str(tiny_clip_dir), clip_at_zero=False, batch_size=2)
    out = r(x, prompts)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(p) for p in pil_images])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    expected = 100 * (img * txt).sum(-1)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=0.3), (out, expected)
    assert out.std() > 1.0  # the scores differ between samples: the comparison above is not trivial
    clipped = load_reward("clip_score", device="cpu", clip_model=str(tiny_clip_dir))(x, prompts)
    assert torch.allclose(clipped, out.clamp_min(0), atol=1e-4) and clipped[1] == 0.0


def test_clip_score_ranks_trained_colours(trained_clip_dir):
    r = load_reward("clip_score", device="cpu", clip_model=str(trained_clip_dir), clip_at_zero=False)
    images = colour_images(noise=0.05, seed=123)  # [red, green]
    for_red = r(images, "a red image")
    for_green = r(images, ["a green image"] * 2)
    assert for_red[0] > for_red[1] + 20
    assert for_green[1] > for_green[0] + 20


def test_model_object_hook_and_backbone_cache(tiny_clip_dir):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    x = colour_images(noise=0.2)
    from_obj = load_reward(
        "clip_score",
        device="cpu",
        clip_model=model,
        clip_at_zero=False,
    )(x, PROMPTS)
    a = load_reward("clip_score", device="cpu", clip_model=str(tiny_clip_dir), clip_at_zero=False)
    b = load_reward("clip_score", device="cpu", clip_model=str(tiny_clip_dir), scale=1.0, clip_at_zero=False)
    assert a.backbone is b.backbone  # loaded once, shared
    assert torch.allclose(a(x, PROMPTS), from_obj, atol=1e-4)
    assert torch.allclose(b(x, PROMPTS) * 100, from_obj, atol=1e-4)


def test_clip_score_dtype_bf16_returns_float32(tiny_clip_dir):
    x = colour_images(noise=0.2)
    ref = load_reward("clip_score", device="cpu", clip_model=str(tiny_clip_dir), clip_at_zero=False)(x, PROMPTS)
    r = load_reward("clip_score", device="cpu", dtype="bf16", clip_model=str(tiny_clip_dir), clip_at_zero=False)
    assert next(r.backbone.model.parameters()).dtype == torch.bfloat16
    out = r(x, PROMPTS)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=3.0)


def test_open_clip_loading_errors(tmp_path, tiny_clip_dir):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    with pytest.raises(RewardWeightsNotFoundError, match="no weights file.*refusing random weights"):
        load_reward("clip_score", device="cpu", clip_model=str(empty))
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    with pytest.raises(RewardWeightsNotFoundError, match="no open_clip_config.json"):
        load_reward("clip_score", device="cpu", clip_model=str(no_cfg))
    with pytest.raises(RewardWeightsNotFoundError, match="not a directory"):
        load_reward("clip_score", device="cpu", clip_model=str(tmp_path / "missing_dir"))
    with pytest.raises(RewardWeightsNotFoundError, match="clip_pretrained is required.*'openai'"):
        load_reward("clip_score", device="cpu", clip_model="ViT-B-32-quickgelu", clip_pretrained=None)
    with pytest.raises(RewardWeightsNotFoundError, match="checkpoint file .*missing.pt"):
        load_reward("clip_score", device="cpu", clip_model="ViT-B-32", clip_pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(RewardWeightsNotFoundError, match="neither a file nor a pretrained tag"):
        load_reward("clip_score", device="cpu", clip_model="ViT-B-32", clip_pretrained="not_a_tag")
    with pytest.raises(RewardConfigError, match="did you mean ViT-B-32"):
        load_reward("clip_score", device="cpu", clip_model="ViT-B-33")


def test_open_clip_name_with_local_checkpoint_file(tmp_path, tiny_clip_dir):
    """clip_model=<registered open_clip name> + clip_pretrained=<checkpoint file>."""
    model, _ = build_tiny_open_clip(seed=0)  # registers the tiny config under its name
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    x = colour_images(noise=0.2)
    by_name = load_reward("clip_score", device="cpu", clip_model="reward-models-tiny-clip", clip_pretrained=str(ckpt), clip_at_zero=False)(x, PROMPTS)
    by_dir = load_reward("clip_score", device="cpu", clip_model=str(tiny_clip_dir), clip_at_zero=False)(x, PROMPTS)
    assert torch.allclose(by_name, by_dir, atol=1e-5)


# ----------------------------------------------------------------------------------------------- aesthetic


def projection_head(direction: torch.Tensor, scale: float = 10.0) -> AestheticMLP:
    """An aesthetic head with the LAION layout whose output is ``scale * <embedding, direction>``."""
    d = direction.numel()
    head = AestheticMLP(input_dim=d)
    with torch.no_grad():
        for i in (0, 2, 4, 6):
            layer = head.layers[i]
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[:d, :d] = torch.eye(d)
        head.layers[7].weight.copy_(scale * direction.view(1, -1))
        head.layers[7].bias.fill_(1.0)
    return head


def test_aesthetic_loads_pth_and_safetensors_exact_scores(tmp_path, trained_clip_dir, monkeypatch):
    from safetensors.torch import save_file

    backbone = load_reward("clip_score", device="cpu", clip_model=str(trained_clip_dir)).backbone
    images = torch.cat([colour_images(noise=0.05, seed=7), torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        emb = F.normalize(backbone.encode_images(images), dim=-1)
    head = projection_head(emb[0])
    assert sorted(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    pth, st = tmp_path / "head.pth", tmp_path / "head.safetensors"
    torch.save(head.state_dict(), pth)
    save_file(head.state_dict(), str(st))

    expected = 10.0 * emb @ emb[0] + 1.0
    r = load_reward("aesthetic", device="cpu", clip_model=str(trained_clip_dir), weights=str(pth), batch_size=2)
    out = r(images, None)
    assert torch.allclose(out, expected, atol=1e-4)
    assert out[0] == pytest.approx(11.0, abs=1e-4) and out[0] > out[1]
    r_st = load_reward("aesthetic", device="cpu", clip_model=str(trained_clip_dir), weights=str(st))
    assert torch.allclose(r_st(images, None), out, atol=1e-5)
    monkeypatch.setenv("REWARD_MODELS_AESTHETIC_WEIGHTS", str(pth))
    r_env = load_reward("aesthetic", device="cpu", clip_model=str(trained_clip_dir))
    assert torch.allclose(r_env(images, ["ignored"] * 5), out, atol=1e-5)

    calls = []
    original = r.backbone.encode_images
    monkeypatch.setattr(r.backbone, "encode_images", lambda im: calls.append(im.shape[0]) or original(im))
    r(images, None)
    assert calls == [2, 2, 1]  # batch_size=2 over 5 images


def test_aesthetic_checkpoint_errors(tmp_path, tiny_clip_dir):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, bad)
    with pytest.raises(RewardWeightsNotFoundError, match=r"layers\.\{0,2,4,6,7\}"):
        load_reward("aesthetic", device="cpu", clip_model=str(tiny_clip_dir), weights=str(bad))
    laion_sized = tmp_path / "laion.pth"
    torch.save(AestheticMLP(768).state_dict(), laion_sized)
    with pytest.raises(RewardConfigError, match="768-d embeddings .* gives 16-d"):
        load_reward("aesthetic", device="cpu", clip_model=str(tiny_clip_dir), weights=str(laion_sized))
    wrapped = tmp_path / "wrapped.pth"  # {"state_dict": ...} with "module." prefixes also loads
    torch.save({"state_dict": {f"module.{k}": v for k, v in AestheticMLP(16).state_dict().items()}}, wrapped)
    r = load_reward("aesthetic", device="cpu", clip_model=str(tiny_clip_dir), weights=str(wrapped))
    assert r(colour_images(), None).shape == (2,)


def test_aesthetic_with_transformers_backbone(tmp_path, hf_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(hf_clip_dir)
    processor = CLIPProcessor.from_pretrained(hf_clip_dir)
    pil, x = test_image(40, 50)
    with torch.no_grad():
        pix = processor(images=pil, return_tensors="pt")["pixel_values"]
        emb = F.normalize(model.visual_projection(model.vision_model(pixel_values=pix).pooler_output), dim=-1)[0]
    path = tmp_path / "head.pth"
    torch.save(projection_head(emb, scale=5.0).state_dict(), path)
    r = load_reward("aesthetic", device="cpu", backend="transformers", clip_model=str(hf_clip_dir), weights=str(path))
    assert r(x, None).item() == pytest.approx(6.0, abs=2e-3)  # 5 * |e|^2 + 1 with e from the HF processor
    assert r(torch.rand(1, 3, 40, 50), None).item() < 5.99


# ----------------------------------------------------------------------------------------------- pickscore


def test_pickscore_matches_transformers_reference(hf_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    pils = [test_image(48, 64, seed=s)[0] for s in range(3)]
    x = torch.cat([test_image(48, 64, seed=s)[1] for s in range(3)])
    prompts = ["a cat", "a dog on a skateboard", "red"]
    r = load_reward("pickscore", device="cpu", model=str(hf_clip_dir), processor=str(hf_clip_dir), batch_size=2)
    out = r(x, prompts)
    model = CLIPModel.from_pretrained(hf_clip_dir)
    processor = CLIPProcessor.from_pretrained(hf_clip_dir)
    with torch.no_grad():
        inputs = processor(images=pils, text=prompts, padding=True, return_tensors="pt")
        expected = model(**inputs).logits_per_image.diagonal()  # logit_scale.exp() * cosine
    assert torch.allclose(out, expected, atol=0.02), (out, expected)
    assert (expected.max() - expected.min()) > 0.05


def test_hf_loading_refuses_missing_or_partial_weights(tmp_path, hf_clip_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    with pytest.raises(RewardWeightsNotFoundError, match="does not exist"):
        load_reward("pickscore", device="cpu", model=str(tmp_path / "nope"), processor=str(hf_clip_dir))
    partial = tmp_path / "partial"
    shutil.copytree(hf_clip_dir, partial)
    state = load_file(str(partial / "model.safetensors"))
    state.pop("visual_projection.weight")
    save_file(state, str(partial / "model.safetensors"))
    with pytest.raises(RewardWeightsNotFoundError, match="randomly initialised"):
        load_reward("pickscore", device="cpu", model=str(partial), processor=str(hf_clip_dir))
    (partial / "model.safetensors").unlink()
    with pytest.raises(RewardWeightsNotFoundError, match="could not load CLIP model"):
        load_reward("pickscore", device="cpu", model=str(partial), processor=str(hf_clip_dir))


# ----------------------------------------------------------------------------------------------- hpsv2 / imagereward


@pytest.fixture
def fake_hpsv2(monkeypatch):
    """Stand-in for the hpsv2 package API we use: hpsv2.src.open_clip.{create_model_and_transforms, get_tokenizer}."""
    built = {}

    def create_model_and_transforms(name, pretrained=None, precision="fp32", device="cpu", output_dict=None, light_augmentation=False):
        assert name == "ViT-H-14" and pretrained is None and light_augmentation
        model, _ = build_tiny_open_clip(seed=99)  # random init, then overwritten by the strict checkpoint load
        built["model"] = model
        # HPSv2's inference transform resizes the longest side and pads
        return model, None, open_clip.image_transform(32, is_train=False, resize_mode="longest")

    oc = types.ModuleType("hpsv2.src.open_clip")
    oc.create_model_and_transforms = create_model_and_transforms
    oc.get_tokenizer = lambda name: open_clip.SimpleTokenizer(context_length=16)
    pkg, src = types.ModuleType("hpsv2"), types.ModuleType("hpsv2.src")
    pkg.src, src.open_clip = src, oc
    for name, mod in (("hpsv2", pkg), ("hpsv2.src", src), ("hpsv2.src.open_clip", oc)):
        monkeypatch.setitem(sys.modules, name, mod)
    return built


def test_hpsv2_wrapper(tmp_path, fake_hpsv2, trained_clip_dir):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{trained_clip_dir}")
    preprocess = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    images = colour_images(noise=0.05, size=48)[..., :40].contiguous()  # 48 x 40: the transform pads
    r = load_reward("hpsv2", device="cpu", weights=str(ckpt), batch_size=1)
    out = r(images, ["a red image", "a red image"])
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(p) for p in pils])), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.SimpleTokenizer(context_length=16)(["a red image"] * 2)), dim=-1)
    assert torch.allclose(out, (img * txt).sum(-1), atol=1e-4)
    assert out[0] > out[1]  # cosine, not x100: HPS scale
    assert out.abs().max() <= 1.0

    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, wrong)
    with pytest.raises(RewardWeightsNotFoundError, match="does not match the HPSv2"):
        load_reward("hpsv2", device="cpu", weights=str(wrong))
    with pytest.raises(RewardWeightsNotFoundError, match="REWARD_MODELS_HPSV2_WEIGHTS"):
        load_reward("hpsv2", device="cpu", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(RewardConfigError, match="version must be one of"):
        load_reward("hpsv2", device="cpu", version="v3")


def test_imagereward_wrapper(monkeypatch):
    seen = {}

    class FakeNet:
        def eval(self):
            return self

        def score(self, prompt, images):
            seen.setdefault(prompt, []).append(len(images))
            vals = [np.asarray(im, dtype=np.float64).mean() / 255 + (10.0 if prompt == "b" else 0.0) for im in images]
            return vals if len(vals) > 1 else vals[0]  # the real package returns a float for one image

    def load(name, device="cpu", download_root=None):
        if name == "missing":
            raise FileNotFoundError("no ImageReward.pt")
        return FakeNet()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.4, 0.6)])
    out = load_reward("imagereward", device="cpu")(images, ["a", "b", "a"])
    assert torch.allclose(out, torch.tensor([0.2, 10.4, 0.6]), atol=3e-3)
    assert seen == {"a": [2], "b": [1]}  # one call per distinct prompt
    with pytest.raises(RewardWeightsNotFoundError, match="THUDM/ImageReward"):
        load_reward("imagereward", device="cpu", model="missing")


# ----------------------------------------------------------------------------------------------- text reward


@pytest.fixture(scope="module")
def text_rm_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=49408, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=2, pad_token_id=49407, eos_token_id=49407, bos_token_id=49406
    )
    model = GPT2ForSequenceClassification(config)
    directory = tmp_path_factory.mktemp("text_rm")
    model.save_pretrained(directory)
    build_clip_tokenizer().save_pretrained(directory)
    return directory


def test_sequence_classifier_scores_are_the_chosen_logit(text_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["Say hi.", "What is 2+2?", "Name a colour.", "Be brief."]
    completions = ["hi", "It is four, because two plus two makes four.", "red", "ok"]
    r = load_reward("sequence_classifier", device="cpu", model=str(text_rm_dir), label=1, batch_size=3)
    out = r(prompts, completions)
    assert isinstance(out, list) and len(out) == 4 and all(isinstance(v, float) for v in out)
    model = AutoModelForSequenceClassification.from_pretrained(text_rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(text_rm_dir)
    with torch.no_grad():
        expected = [model(**tok([p + c], return_tensors="pt")).logits[0, 1].item() for p, c in zip(prompts, completions)]
    assert out == pytest.approx(expected, abs=1e-4)  # padded batches give the unpadded scores
    label0 = load_reward("sequence_classifier", device="cpu", model=str(text_rm_dir), label=0)(prompts, completions)
    assert label0 != pytest.approx(out, abs=1e-3)
    conv = r([[{"role": "user", "content": p}] for p in prompts], [[{"role": "assistant", "content": c}] for c in completions])
    assert conv == pytest.approx(out, abs=1e-4)  # trl conversational format, concat input (no chat template)


def test_sequence_classifier_errors(tmp_path, text_rm_dir):
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(RewardConfigError, match="pass model="):
        load_reward("sequence_classifier", device="cpu")
    with pytest.raises(RewardConfigError, match="label 5 out of range for 2 logits"):
        load_reward("sequence_classifier", device="cpu", model=str(text_rm_dir), label=5)
    with pytest.raises(RewardConfigError, match="no chat template"):
        load_reward("sequence_classifier", device="cpu", model=str(text_rm_dir), input_format="chat")
    base = tmp_path / "base_lm"  # a checkpoint without the classification head: the head would be random
    GPT2Model(GPT2Config(vocab_size=49408, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(base)
    build_clip_tokenizer().save_pretrained(base)
    with pytest.raises(RewardWeightsNotFoundError, match="randomly initialised"):
        load_reward("sequence_classifier", device="cpu", model=str(base))


# ----------------------------------------------------------------------------------------------- no network


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, as on CI."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def test_hub_ids_without_network_fail_clearly(offline_hub):
    with pytest.raises(RewardWeightsNotFoundError) as ei:
        load_reward("pickscore", device="cpu", model="reward-models-test/no-such-clip", processor="reward-models-test/no-such-processor")
    msg = str(ei.value)
    assert "'reward-models-test/no-such-clip'" in msg and "pass the local directory" in msg
    with pytest.raises(RewardWeightsNotFoundError, match="HPS_v2.1_compressed.pt.*REWARD_MODELS_HPSV2_WEIGHTS"):
        from reward_models.weights import resolve_weights

        resolve_weights("hf://xswu/HPSv2/HPS_v2.1_compressed.pt", what="HPSv2 checkpoint", env_var="REWARD_MODELS_HPSV2_WEIGHTS")
    with pytest.raises(RewardWeightsNotFoundError, match="pretrained='openai'.*clip_model='/path/to/dir'"):
        load_reward("clip_score", device="cpu", clip_model="ViT-B-32-quickgelu", clip_pretrained="openai")
