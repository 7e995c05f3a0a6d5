"""The model builder on tiny random checkpoints of every supported architecture (no download)."""
import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.config import LoraArgs, ModelArgs
from training.model.architectures import ARCHITECTURES, detect_architecture
from training.model.builder import enable_gradient_checkpointing, load_model_and_processor, save_model
from training.model.parts import build_from_parts
from training.model.tiny_archs import SUPPORTED_TINY, build_tokenizer, make_tiny_checkpoint

ARCHS = [a for a in SUPPORTED_TINY if a != "smolvlm" or importlib.util.find_spec("num2words")]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """arch name -> tiny checkpoint dir, built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_checkpoint(a, root / a) for a in ARCHS}


def _batch(processor, n_images=1):
    """One conversation (image + question, answer) through the chat template and the processor."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "What is shown?"}]
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.new("RGB", (40, 30), (200, 20 + 60 * i, 20)) for i in range(n_images)]
    return processor(images=images, text=[text], return_tensors="pt", add_special_tokens=False)


def _loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def _load(path, lora=None, **model_kw):
    return load_model_and_processor(ModelArgs(from_checkpoint=path, **model_kw), lora or LoraArgs())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(tiny_ckpts, arch):
    model, processor, spec = _load(tiny_ckpts[arch])
    assert spec.name == ("idefics3" if arch == "smolvlm" else arch)
    assert all(spec.param_group(n) for n, _ in model.named_parameters()), "every parameter has a group"
    batch = _batch(processor)
    if arch != "mllama":  # mllama cross-attends: one <|image|> token; the others expand it
        n_img = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(spec.image_token)).sum().item()
        assert 1 <= n_img <= 64
    loss = _loss(model, batch)
    assert math.isfinite(loss.item())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # only the vision tower may hold unused weights (llava*: features from layer -2, so the last layer)
    assert all(g is not None for n, g in grads.items() if spec.param_group(n) != "vision")
    grads = {n: g for n, g in grads.items() if g is not None}
    for group in ("vision", "projector", "lm"):  # the image reaches the loss: every group learns
        assert any(g.abs().sum() > 0 for n, g in grads.items() if spec.param_group(n) == group), group


@pytest.mark.parametrize("arch", ARCHS)
def test_freezing(tiny_ckpts, arch):
    for flag, group in (("freeze_vision_tower", "vision"), ("freeze_projector", "projector"),
                        ("freeze_language_model", "lm")):
        model, _, spec = _load(tiny_ckpts[arch], **{flag: True})
        for n, p in model.named_parameters():
            assert p.requires_grad == (spec.param_group(n) != group), (flag, n)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_only_adapters_train(tiny_ckpts, arch):
    model, processor, spec = _load(tiny_ckpts[arch], LoraArgs(lora_r=4), freeze_vision_tower=True, freeze_projector=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_modules = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert lora_modules and all(spec.param_group(n + ".weight") == "lm" for n in lora_modules)
    _loss(model, _batch(processor)).backward()
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_lora_keeps_trainable_projector(tiny_ckpts):
    model, _, spec = _load(tiny_ckpts["llava"], LoraArgs(lora_r=4), freeze_vision_tower=True)
    groups = {spec.param_group(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert groups == {"projector"}


def test_lora_and_frozen_language_model_conflict(tiny_ckpts):
    with pytest.raises(ValueError, match="freeze_language_model"):
        _load(tiny_ckpts["llava"], LoraArgs(lora_r=4), freeze_language_model=True)


def test_qlora_4bit_on_cpu(tiny_ckpts):
    import bitsandbytes as bnb
    model, processor, spec = _load(tiny_ckpts["llava"], LoraArgs(lora_r=4, qlora=True), freeze_vision_tower=True)
    q4 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q4 and all(spec.param_group(n + ".weight") == "lm" for n in q4)  # vision/projector not quantized
    assert model.get_base_model().model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8
    loss = _loss(model, _batch(processor))
    assert math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def _moved_lora(path, lora: LoraArgs):
    """A LoRA model whose trainables moved (stand-in for training: nonzero adapters, moved projector), in eval
    mode, with its processor, a batch and its logits."""
    model, processor, _ = _load(path, lora, freeze_vision_tower=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    batch = _batch(processor)
    with torch.no_grad():
        return model, processor, batch, model(**batch).logits


def test_qlora_gradients_are_the_same_after_an_eval_forward(tiny_ckpts):
    """bitsandbytes repacked the 4-bit weights for a bf16 CPU kernel at the first eval-mode forward (a PPO rollout,
    a reference or held-out pass) and used it in training afterwards: other logits, and no gradient through the
    frozen 4-bit layers, so the adapters below them got wrong gradients for the rest of the run."""
    def grads(eval_first):
        torch.manual_seed(0)
        model, processor, _ = _load(tiny_ckpts["llava"], LoraArgs(lora_r=4, lora_dropout=0.0, qlora=True),
                                    freeze_vision_tower=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn_like(p))
        batch = _batch(processor)
        with torch.no_grad():
            model.eval()
            evaluated = model(**batch).logits if eval_first else None
        model.train()
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        if eval_first:
            torch.testing.assert_close(evaluated, out.logits.detach(), rtol=0, atol=1e-5)
        return {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys() and len(plain) > 4
    for n in plain:
        torch.testing.assert_close(after_eval[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_qlora_merge_computes_what_was_trained(tiny_ckpts, tmp_path):
    """QLoRA adapters were merged into the base's full-precision weights, not the 4-bit ones they were trained
    against: the merged model (what the next stage and predict load) was not the trained one."""
    from training.model.merge_lora import main as merge_cli
    model, processor, batch, trained = _moved_lora(tiny_ckpts["llava"], LoraArgs(lora_r=4, lora_dropout=0.0,
                                                                                  qlora=True))
    save_model(model, processor, tmp_path / "run")
    merge_cli(["--adapter_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "merged")])
    merge_cli(["--adapter_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "orig"), "--original_base"])
    got = {}
    for name in ("merged", "orig"):
        m, _, _ = _load(str(tmp_path / name))
        m.eval()
        with torch.no_grad():
            got[name] = m(**batch).logits
    torch.testing.assert_close(got["merged"], trained, rtol=1e-4, atol=1e-4)
    assert float((got["orig"] - trained).abs().max()) > 1e-2  # the full-precision base is another model


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_same_grads(tiny_ckpts, arch):
    model, processor, _ = _load(tiny_ckpts[arch])
    batch = _batch(processor)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.zero_grad()
        _loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_with_lora(tiny_ckpts):
    model, processor, _ = _load(tiny_ckpts["qwen2_vl"], LoraArgs(lora_r=4), gradient_checkpointing=True,
                                freeze_vision_tower=True)
    assert model.get_base_model().is_activation_checkpointing
    _loss(model, _batch(processor)).backward()
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_unknown_architecture_lists_supported(tiny_ckpts):
    with pytest.raises(ValueError) as e:
        detect_architecture(SimpleNamespace(model_type="gpt2"))
    assert all(name in str(e.value) for name in ARCHITECTURES)
    with pytest.raises(ValueError, match="llava_next"):
        detect_architecture(None, override="blip2")
    assert detect_architecture(SimpleNamespace(model_type="smolvlm")).name == "idefics3"
    assert detect_architecture(SimpleNamespace(model_type="gpt2"), override="qwen2_vl").name == "qwen2_vl"
    with pytest.raises(ValueError, match="supported"):
        _load(tiny_ckpts["llava"], model_architecture="nope")


def test_tiny_templates_close_turns_and_prefix(tiny_ckpts):
    from transformers import AutoProcessor
    end = {"llava": "</s>", "llava_next": "</s>", "mllama": "<|eot_id|>", "idefics3": "<end_of_utterance>\n",
           "smolvlm": "<end_of_utterance>\n", "qwen2_vl": "<|im_end|>\n", "qwen2_5_vl": "<|im_end|>\n"}
    for arch in ARCHS:
        processor = AutoProcessor.from_pretrained(tiny_ckpts[arch])
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
        gen = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = processor.apply_chat_template(prompt + [{"role": "assistant", "content": "Yes."}], tokenize=False)
        assert full.startswith(gen) and full.endswith("Yes." + end[arch]), arch
        assert gen.count(ARCHITECTURES["idefics3" if arch == "smolvlm" else arch].image_token) == 1, arch


def _tiny_lm(kind, path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    if kind == "llama":
        tok = build_tokenizer(["<unk>", "<s>", "</s>"], add_bos="<s>", unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>")
        cls, cfg = LlamaForCausalLM, LlamaConfig
    else:
        tok = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], add_bos=None,
                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
        cls, cfg = Qwen2ForCausalLM, Qwen2Config
    model = cls(cfg(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "qwen2"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _tiny_vision(kind, path):
    import transformers
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=32, patch_size=8)
    prefix = "CLIP" if kind == "clip" else "Siglip"
    model = getattr(transformers, f"{prefix}VisionModel")(getattr(transformers, f"{prefix}VisionConfig")(**cfg))
    model.save_pretrained(path)
    size = {"shortest_edge": 32} if kind == "clip" else {"height": 32, "width": 32}
    extra = {"crop_size": {"height": 32, "width": 32}} if kind == "clip" else {}
    getattr(transformers, f"{prefix}ImageProcessor")(size=size, **extra).save_pretrained(path)
    return model


@pytest.mark.parametrize("vision_kind,lm_kind", [("clip", "llama"), ("siglip", "qwen2")])
def test_build_from_parts(tmp_path, monkeypatch, vision_kind, lm_kind):
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))  # where the builder composes parts
    vision = _tiny_vision(vision_kind, tmp_path / "vision")
    lm, tok = _tiny_lm(lm_kind, tmp_path / "lm")
    out = build_from_parts(str(tmp_path / "vision"), str(tmp_path / "lm"), tmp_path / "vlm")
    model, processor, spec = _load(out)
    assert spec.name == "llava" and "<image>" in processor.tokenizer.get_vocab()
    # pretrained weights of both parts were copied
    torch.testing.assert_close(model.model.vision_tower.state_dict(), vision.state_dict())
    ids = tok("red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        vocab = lm.config.vocab_size
        torch.testing.assert_close(model(input_ids=ids).logits[..., :vocab], lm(input_ids=ids).logits)
    loss = _loss(model, _batch(processor))
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    # the same through ModelArgs(vision_tower=..., language_model=...)
    model2, _, _ = load_model_and_processor(
        ModelArgs(vision_tower=str(tmp_path / "vision"), language_model=str(tmp_path / "lm")), LoraArgs())
    torch.testing.assert_close(model2.state_dict(), model.state_dict())


def _tiny_open_clip(tmp_path):
    """Register a tiny open_clip architecture (random weights, nothing downloaded)."""
    import json

    import open_clip
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16,
                          "mlp_ratio": 2.0},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-vit-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-vit-test.json")
    return "tiny-vit-test"


def test_open_clip_conversion_same_features(tmp_path):
    import open_clip

    from training.model.parts import open_clip_to_clip_vision
    arch = _tiny_open_clip(tmp_path)
    visual = open_clip.create_model(arch, pretrained=None).visual.eval()
    hf = open_clip_to_clip_vision(visual, quick_gelu=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output @ visual.proj, visual(x), rtol=1e-4, atol=1e-5)


def test_build_from_parts_open_clip(tmp_path):
    arch = _tiny_open_clip(tmp_path)
    _tiny_lm("llama", tmp_path / "lm")
    out = build_from_parts(f"open_clip:{arch}", str(tmp_path / "lm"), tmp_path / "vlm", image_size=48)
    model, processor, _ = _load(out)
    assert model.config.vision_config.image_size == 48
    batch = _batch(processor)
    assert (batch["input_ids"] == model.config.image_token_index).sum() == (48 // 8) ** 2
    assert math.isfinite(_loss(model, batch).item())
    with pytest.raises(FileNotFoundError, match="local file"):
        build_from_parts(f"open_clip:{arch}:/nonexistent.pt", str(tmp_path / "lm"), tmp_path / "vlm2")


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_save_reload_identical_logits(tiny_ckpts, tmp_path, arch):
    model, processor, _ = _load(tiny_ckpts[arch])
    with torch.no_grad():  # stand-in for training: weights differ from the checkpoint
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    batch = _batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    save_model(model, processor, tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.bin"))
    reloaded, processor2, _ = _load(str(tmp_path / "saved"))
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(**_batch(processor2)).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_merge_lora_same_logits(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))  # where the builder merges on the fly
    from training.model.merge_lora import main as merge_cli
    model, processor, batch, expected = _moved_lora(tiny_ckpts["llava"], LoraArgs(lora_r=4, lora_dropout=0.0))
    save_model(model, processor, tmp_path / "run")
    merge_cli(["--adapter_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "merged")])
    merged, _, _ = _load(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # a LoRA run's output dir also loads directly (merged on the fly)
    direct, _, _ = _load(str(tmp_path / "run"))
    for m in (merged, direct):
        m.eval()
        with torch.no_grad():
            torch.testing.assert_close(m(**batch).logits, expected, rtol=1e-4, atol=1e-5)

    # every load of the LoRA checkpoint reuses one merged copy (was: a new full copy in /tmp per load); lock files aside
    _load(str(tmp_path / "run"))
    assert len([p for p in (tmp_path / "cache" / "merged").iterdir() if not p.name.startswith(".")]) == 1
    # LoRA trained from the LoRA checkpoint records that checkpoint as its base, not the temporary merge,
    # and loads by merging both in turn
    chained, proc2, _ = _load(str(tmp_path / "run"), LoraArgs(lora_r=4, lora_dropout=0.0), freeze_vision_tower=True)
    assert chained._vlm_build_info["base"] == str(tmp_path / "run")
    save_model(chained, proc2, tmp_path / "run2")
    again, _, _ = _load(str(tmp_path / "run2"))
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, rtol=1e-4, atol=1e-5)  # new adapters are 0

    # the adapter's own files cannot turn on trust_remote_code (a downloaded adapter would run code): the
    # user's flag decides
    from training.model.builder import ADAPTER_SUBDIR, BUILD_INFO_FILE
    info_file = tmp_path / "run" / ADAPTER_SUBDIR / BUILD_INFO_FILE
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "trust_remote_code": True}))
    with pytest.raises(SystemExit, match="--trust_remote_code"):
        merge_cli(["--adapter_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "merged2")])
    with pytest.raises(SystemExit, match="--trust_remote_code"):
        _load(str(tmp_path / "run"))
    merge_cli(["--adapter_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "merged2"),
               "--trust_remote_code"])
    # adapters load from safetensors only (peft fell back to a pickled adapter_model.bin)
    weights = tmp_path / "run" / ADAPTER_SUBDIR / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_name("adapter_model.bin"))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        merge_cli(["--adapter_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "merged3"),
                   "--trust_remote_code"])


def test_a_lora_checkpoint_is_merged_again_when_what_loading_reads_changes_only(tiny_ckpts, tmp_path, monkeypatch):
    """The merge was keyed by every JSON file beside the adapters: each score written there (eval_*.json) made another
    full merged copy; and a retrained base was not merged again (the old base's merge was loaded)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from training.model.builder import merged_checkpoint
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpts["llava"], base)
    model, processor, _, _ = _moved_lora(str(base), LoraArgs(lora_r=4, lora_dropout=0.0))
    save_model(model, processor, tmp_path / "run")
    first = merged_checkpoint(str(tmp_path / "run"))
    for name in ("eval_embedded.json", "run_config.json", "pipeline_stage.json", "bad_rows.json"):
        (tmp_path / "run" / name).write_text("{}")
    assert merged_checkpoint(str(tmp_path / "run")) == first
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    again = merged_checkpoint(str(tmp_path / "run"))
    assert again != first
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(load_file(str(Path(again) / "model.safetensors"))[key], weights[key] + 1)


def test_pickled_weights_are_refused(tiny_ckpts, tmp_path):
    """Safetensors only: a checkpoint holding pytorch_model.bin loaded through torch.load (pickle), and open_clip
    read a .pt weights file the same way."""
    import shutil

    ckpt = tmp_path / "bin"
    shutil.copytree(tiny_ckpts["llava"], ckpt)
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        _load(str(ckpt))
    arch = _tiny_open_clip(tmp_path)
    (tmp_path / "clip.pt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        build_from_parts(f"open_clip:{arch}:{tmp_path / 'clip.pt'}", str(tmp_path / "lm"), tmp_path / "vlm")


def test_default_is_embedded_tiny_vlm_and_inference_mode_is_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("training.model.tiny.VISION_PRETRAIN_STEPS", 0)  # pre-training: tests/test_tiny_vision.py
    model, processor, spec = load_model_and_processor(ModelArgs(), LoraArgs(lora_r=4), for_training=False)
    assert spec.name == "llava" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config")  # no LoRA when not training


def test_model_cache_is_private_to_the_user(tmp_path, monkeypatch):
    """Built models load from the cache unchecked, so it lives in the user's cache folder, is created 0700, and
    one others can write to is refused (it was a shared /tmp folder: another user could plant a model)."""
    import os
    import stat

    from training.model.cache import cache_dir, cache_root
    monkeypatch.delenv("VLM_ALIGN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "vlm_align"
    assert cache_dir("merged") == tmp_path / "xdg" / "vlm_align" / "merged"
    assert stat.S_IMODE(os.stat(tmp_path / "xdg" / "vlm_align").st_mode) == 0o700
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    os.chmod(tmp_path / "shared", 0o777)
    with pytest.raises(PermissionError, match="others can write"):
        cache_dir()
    os.chmod(tmp_path / "shared", 0o755)
    assert cache_dir("tiny_vlm").is_dir()


def test_the_model_cache_is_used_where_it_was_checked(tmp_path, monkeypatch):
    """A cache root reached through a symbolic link was checked through the link and returned through it: a link in
    a shared /tmp, another user's, could point at a folder of ours for the check and at theirs (a planted model)
    when the model loaded."""
    from training.model.cache import cache_dir
    (tmp_path / "mine").mkdir(mode=0o700)
    (tmp_path / "theirs" / "merged").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "link"))
    merged = cache_dir("merged")
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(tmp_path / "theirs")  # re-pointed after the check
    assert merged.resolve() == tmp_path / "mine" / "merged"


def test_lora_saved_beside_its_own_base_keeps_it_and_merge_refuses_its_own_folder(tiny_ckpts, tmp_path, monkeypatch):
    """save_model removes a model of the other kind from its folder, but not the full weights a LoRA run trained
    from that same folder needs as its base; merge_lora into the adapters' own folder would replace them."""
    import shutil

    from training.model.merge_lora import main as merge_cli
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    own = tmp_path / "own"
    shutil.copytree(tiny_ckpts["llava"], own)
    model, processor, batch, expected = _moved_lora(str(own), LoraArgs(lora_r=4, lora_dropout=0.0))
    save_model(model, processor, own)
    assert (own / "model.safetensors").exists() and (own / "adapter").is_dir()
    merged, _, _ = _load(str(own))  # the adapters merged into the base beside them
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="adapters' own folder"):
        merge_cli(["--adapter_dir", str(own), "--output_dir", str(own)])


def test_a_hub_models_fingerprint_follows_its_cached_revision(tmp_path, monkeypatch):
    """A Hub id's fingerprint was its name alone: a new revision of the model reused the reference log-probs and
    benchmark answers cached for the old one. It now holds the local cache's current snapshot's files."""
    import huggingface_hub.constants

    from training.model.fingerprint import model_fingerprint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from sft_helpers import hub_revision

    def revision(commit: str, content: str) -> None:
        hub_revision(tmp_path, "org/vlm", commit, content)

    uncached = model_fingerprint("org/vlm")
    assert model_fingerprint("org/other") != uncached
    revision("c1", "first")
    first = model_fingerprint("org/vlm")
    assert first != uncached and model_fingerprint("org/vlm") == first
    revision("c2", "second")
    assert model_fingerprint("org/vlm") not in (first, uncached)
    # a path that is no folder and no repo id (the Hub's validation refuses it) is its name: no error
    assert model_fingerprint(str(tmp_path / "no such folder")) != model_fingerprint(str(tmp_path / "another"))


def test_a_checkpoints_own_model_code_is_in_its_fingerprint(tmp_path):
    """A checkpoint loaded with trust_remote_code runs its own modeling_*.py: edited, the model is another, but the
    fingerprint (what reference caches and benchmark answers are keyed by) stayed the same."""
    import os

    from training.model.fingerprint import model_fingerprint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    code = ckpt / "modeling_x.py"
    code.write_text("A = 1\n")
    before = model_fingerprint(ckpt)
    code.write_text("A = 22\n")
    os.utime(code, ns=(1, 1))
    assert model_fingerprint(ckpt) != before


def test_saved_weights_have_the_umask_mode_of_the_files_beside_them(tiny_ckpts, tmp_path):
    """safetensors writes through a 0600 temporary file: a saved model's weights (full, adapters, non-LoRA
    trainables, a reward model's head) could be read by their owner alone, beside a world-readable config."""
    import os
    import stat

    from training.rm.model import RewardModel
    old = os.umask(0o022)
    try:
        plain, processor, _ = _load(tiny_ckpts["llava"])
        save_model(plain, processor, tmp_path / "plain")
        RewardModel(plain).save_pretrained(tmp_path / "rm")
        lora, processor, _ = _load(tiny_ckpts["llava"], LoraArgs(lora_r=4))
        save_model(lora, processor, tmp_path / "lora")
    finally:
        os.umask(old)
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.rglob("*.safetensors")}
    assert set(modes) >= {"plain/model.safetensors", "rm/model.safetensors", "rm/value_head.safetensors",
                          "lora/adapter/adapter_model.safetensors", "lora/adapter/non_lora_trainables.safetensors"}
    assert modes == {name: "0o644" for name in modes}
