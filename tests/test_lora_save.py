"""Saving LoRA models into a folder that holds an earlier LoRA model: what loads from it is the model saved last."""
import shutil

import pytest
import torch

from test_builder import _batch, _load
from training.config import LoraArgs
from training.model.builder import save_model
from training.model.tiny_archs import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_checkpoint("llava", tmp_path_factory.mktemp("tiny") / "llava")


def _trained(path, **freeze):
    """A LoRA model on path whose trainables moved (a stand-in for training), in eval mode, and its processor."""
    model, processor, _ = _load(str(path), LoraArgs(lora_r=4, lora_dropout=0.0), freeze_vision_tower=True, **freeze)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval(), processor


def _logits(model, processor):
    with torch.no_grad():
        return model(**_batch(processor)).logits


def _loaded_logits(path):
    model, processor, _ = _load(str(path))
    return _logits(model.eval(), processor)


def test_a_lora_model_saved_over_another_leaves_none_of_its_trained_weights(llava, tmp_path, monkeypatch):
    """The earlier model's projector, trained in full beside its adapters (non_lora_trainables.safetensors), stayed
    in the folder when the model saved over it trained its adapters only, and was merged into it on every load."""
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    first, processor = _trained(llava)
    save_model(first, processor, tmp_path / "run")
    second, processor = _trained(llava, freeze_projector=True)
    save_model(second, processor, tmp_path / "run")
    torch.testing.assert_close(_loaded_logits(tmp_path / "run"), _logits(second, processor), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("own_base", [False, True])
def test_lora_trained_from_a_lora_checkpoint_saves_into_that_folder(llava, tmp_path, monkeypatch, own_base):
    """A LoRA run from a LoRA checkpoint, saved into that checkpoint's folder, wrote its adapters over the ones its
    base was made of: the folder then failed to load (no base model in it), or, where the first adapters had been
    saved beside their own base's full weights, loaded as that base with the new adapters, the first ones lost."""
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    if own_base:
        shutil.copytree(llava, run)
    first, processor = _trained(run if own_base else llava)
    save_model(first, processor, run)
    second, processor = _trained(run, freeze_projector=True)
    save_model(second, processor, run)
    torch.testing.assert_close(_loaded_logits(run), _logits(second, processor), rtol=1e-4, atol=1e-5)


def test_adapters_on_an_output_layer_tied_to_the_input_embeddings_merge_into_it_alone(tmp_path, monkeypatch):
    """LoRA on lm_head (--lora_target_modules ...,lm_head) of a language model whose output layer shares the input
    embeddings' weight (Qwen2's small models): the merge wrote the adapters into that shared weight, so the input
    embeddings changed too and the merged model (what every later stage loads) was not the trained one."""
    from test_builder import _tiny_lm, _tiny_vision
    from training.model.parts import build_from_parts
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    _tiny_vision("siglip", tmp_path / "vision")
    _tiny_lm("qwen2", tmp_path / "lm")
    vlm = build_from_parts(str(tmp_path / "vision"), str(tmp_path / "lm"), tmp_path / "vlm")
    model, processor, _ = _load(vlm, LoraArgs(lora_r=4, lora_dropout=0.0, lora_target_modules="q_proj,lm_head"),
                                freeze_vision_tower=True, freeze_projector=True)
    assert model.get_base_model().lm_head.base_layer.weight is model.get_base_model().get_input_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_model(model.eval(), processor, tmp_path / "run")
    torch.testing.assert_close(_loaded_logits(tmp_path / "run"), _logits(model, processor), rtol=1e-4, atol=1e-5)


def _trained_in_a_repository(llava, tmp_path, monkeypatch):
    """A LoRA run from output/sft in tmp_path/repo, as the stage scripts start one there, saved to output/run:
    (model, processor, its adapter folder)."""
    from training.model.builder import ADAPTER_SUBDIR
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    shutil.copytree(llava, tmp_path / "repo" / "output" / "sft")
    monkeypatch.chdir(tmp_path / "repo")
    model, processor = _trained("output/sft")
    save_model(model, processor, "output/run")
    return model, processor, tmp_path / "repo" / "output" / "run" / ADAPTER_SUBDIR


def test_lora_trained_from_a_relative_path_loads_from_another_working_folder(llava, tmp_path, monkeypatch):
    """A LoRA run started from a relative --from_checkpoint (output/sft, as the stage scripts pass it) recorded that
    relative path as its adapters' base (build info and peft's adapter_config.json): loaded from another working
    folder (the Python API, a notebook) the base was looked for there, and the checkpoint failed to load."""
    import json

    from training.model.builder import BUILD_INFO_FILE
    model, processor, adapter = _trained_in_a_repository(llava, tmp_path, monkeypatch)
    for name, key in ((BUILD_INFO_FILE, "base"), ("adapter_config.json", "base_model_name_or_path")):
        assert json.loads((adapter / name).read_text())[key] == str(tmp_path / "repo" / "output" / "sft")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    torch.testing.assert_close(_loaded_logits(tmp_path / "repo" / "output" / "run"), _logits(model, processor),
                               rtol=1e-4, atol=1e-5)


def test_an_adapter_saved_with_a_relative_base_loads_from_another_working_folder(llava, tmp_path, monkeypatch):
    """Adapters saved before bases were recorded absolute hold the base relative to the repository, where the
    run_*.sh scripts run (output/sft): loaded from another working folder, merging them looked for the base there."""
    import json

    import training.model.builder as builder
    from training.model.builder import BUILD_INFO_FILE
    model, processor, adapter = _trained_in_a_repository(llava, tmp_path, monkeypatch)
    for name, key in ((BUILD_INFO_FILE, "base"), ("adapter_config.json", "base_model_name_or_path")):  # as before
        record = json.loads((adapter / name).read_text())
        (adapter / name).write_text(json.dumps({**record, key: "output/sft"}))
    monkeypatch.setattr(builder, "REPOSITORY", tmp_path / "repo")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    torch.testing.assert_close(_loaded_logits(tmp_path / "repo" / "output" / "run"), _logits(model, processor),
                               rtol=1e-4, atol=1e-5)


def test_a_merge_is_saved_in_the_training_runs_precision_unless_told_another(llava, tmp_path, monkeypatch):
    """merge_lora's --precision defaults to the run's (recorded beside the adapters); merging every run in fp32
    passed every test, which train in fp32 only. A run recorded as bf16 merges to bf16 weights."""
    import json

    from safetensors.torch import load_file

    from training.model.builder import ADAPTER_SUBDIR, BUILD_INFO_FILE
    from training.model.merge_lora import merge_lora
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    model, processor = _trained(llava)
    save_model(model, processor, tmp_path / "run")
    info_file = tmp_path / "run" / ADAPTER_SUBDIR / BUILD_INFO_FILE
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "precision": "bf16"}))
    for name, precision, dtype in (("own", None, torch.bfloat16), ("told", "fp32", torch.float32)):
        merge_lora(tmp_path / "run", tmp_path / name, precision)
        weights = load_file(str(tmp_path / name / "model.safetensors"))
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {dtype}, name
