"""What the builder writes while several ranks run (torch.distributed up): transformers' save_pretrained writes a
model's weights on global rank 0 only, so a folder each rank made for itself held none on the others."""
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from training.config import LoraArgs, ModelArgs
from training.model.builder import load_model_and_processor, save_model
from training.model.tiny_archs import make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parent))


def _rank(rank: int, port: int, tmp: str) -> None:
    import training.model.merge_lora as merge_lora
    from training.model.builder import resolve_checkpoint
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), VLM_ALIGN_CACHE=f"{tmp}/cache")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    merges = []
    real = merge_lora.merge_lora
    merge_lora.merge_lora = lambda *a, **k: merges.append(1) or real(*a, **k)
    merged = resolve_checkpoint(ModelArgs(from_checkpoint=f"{tmp}/lora"))
    from test_builder import _tiny_lm, _tiny_vision
    if rank == 0:
        _tiny_vision("clip", Path(tmp) / "vision")
        _tiny_lm("llama", Path(tmp) / "lm")
    torch.distributed.barrier()
    parts = resolve_checkpoint(ModelArgs(vision_tower=f"{tmp}/vision", language_model=f"{tmp}/lm"))
    n_merges = len(merges)
    broken = Path(tmp, "broken")  # rank 0's merge fails (its base is gone): every rank stops, none waits
    try:
        resolve_checkpoint(ModelArgs(from_checkpoint=str(broken)))
        error = ""
    except Exception as err:  # noqa: BLE001 - recorded for the test
        error = f"{type(err).__name__}: {err}"
    Path(tmp, f"rank{rank}.json").write_text(json.dumps({"merged": merged, "parts": parts, "merges": n_merges,
                                                        "error": error}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_rank_zero_merges_and_builds_from_parts_for_every_rank(tmp_path):
    model, processor, _ = load_model_and_processor(
        ModelArgs(from_checkpoint=make_tiny_checkpoint("llava", tmp_path / "llava")), LoraArgs(lora_r=4))
    save_model(model, processor, tmp_path / "lora")
    shutil.copytree(tmp_path / "lora", tmp_path / "broken")
    info = tmp_path / "broken" / "adapter" / "vlm_builder.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "base": str(tmp_path / "gone")}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["merges"] for g in got] == [1, 0]  # rank 1's own merge had no weights, and could win the rename
    assert Path(got[0]["parts"]).parent == tmp_path / "cache" / "from_parts"  # not a machine's own /tmp
    assert got[0]["error"] and "rank 0 could not make the checkpoint" in got[1]["error"], got
    for key in ("merged", "parts"):
        assert got[0][key] == got[1][key], key
        assert (Path(got[0][key]) / "model.safetensors").is_file() and (Path(got[0][key]) / "config.json").is_file()


def test_a_merge_left_without_weights_is_made_again(tmp_path, monkeypatch):
    """What the race above left in the cache (a folder with the processor's files and a config, no weights) was
    returned by every later run."""
    from training.model.builder import merged_checkpoint
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    model, processor, _ = load_model_and_processor(
        ModelArgs(from_checkpoint=make_tiny_checkpoint("llava", tmp_path / "llava")), LoraArgs(lora_r=4))
    save_model(model, processor, tmp_path / "lora")
    first = Path(merged_checkpoint(str(tmp_path / "lora")))
    (first / "model.safetensors").unlink()
    again = Path(merged_checkpoint(str(tmp_path / "lora")))
    assert again == first and (again / "model.safetensors").is_file()


def test_a_model_from_parts_is_composed_once_per_version_of_its_parts(tmp_path, monkeypatch):
    from test_builder import _tiny_lm, _tiny_vision

    import training.model.builder as builder
    import training.model.parts as parts
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    _tiny_vision("clip", tmp_path / "vision")
    _tiny_lm("llama", tmp_path / "lm")
    builds = []
    real = parts.build_from_parts
    monkeypatch.setattr(parts, "build_from_parts", lambda *a: builds.append(1) or real(*a))
    args = ModelArgs(vision_tower=str(tmp_path / "vision"), language_model=str(tmp_path / "lm"))
    first = builder.resolve_checkpoint(args)
    assert builder.resolve_checkpoint(args) == first and len(builds) == 1
    _tiny_lm("qwen2", tmp_path / "lm")  # another language model in the same folder
    assert builder.resolve_checkpoint(args) != first and len(builds) == 2


def test_a_model_from_hub_parts_is_composed_again_for_a_new_revision(tmp_path, monkeypatch):
    """Parts named by Hub id were versioned by their names alone: a new revision in the local Hub cache reused the
    composition of the old one."""
    import huggingface_hub.constants

    import training.model.builder as builder
    import training.model.parts as parts
    monkeypatch.setenv("VLM_ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def build(vision, lm, out):  # stands in for the composition (the parts here hold a config only)
        Path(out, "model.safetensors").write_bytes(b"weights")
        return out
    monkeypatch.setattr(parts, "build_from_parts", build)

    from sft_helpers import hub_revision

    def revision(name: str, commit: str) -> None:
        hub_revision(tmp_path / "hub", f"org/{name}", commit)

    revision("clip", "v1")
    revision("lm", "l1")
    args = ModelArgs(vision_tower="org/clip", language_model="org/lm")
    first = builder.resolve_checkpoint(args)
    assert builder.resolve_checkpoint(args) == first
    revision("lm", "l2")
    assert builder.resolve_checkpoint(args) != first


def _independent_process(tmp: str, barrier) -> None:
    import time

    from training.model.builder import _built_once

    def build(staging: str) -> str:
        with open(Path(tmp) / "builds.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a merge takes a while: the other process asks meanwhile
        Path(staging, "model.safetensors").write_bytes(b"weights")
        return staging
    barrier.wait()
    Path(tmp, f"got{os.getpid()}.txt").write_text(_built_once(Path(tmp) / "cache" / "merged" / "key", build))


def test_independent_processes_make_a_cached_checkpoint_once(tmp_path):
    """run_predict.sh's chunk processes (no process group between them) on one LoRA checkpoint each merged it, N
    merges of the model in memory at once; the first makes it now, the others wait and load it."""
    (tmp_path / "cache" / "merged").mkdir(parents=True)  # as training.model.cache.cache_dir leaves it
    ctx = torch.multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_independent_process, args=(str(tmp_path), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    got = {f.read_text() for f in tmp_path.glob("got*.txt")}
    assert got == {str(tmp_path / "cache" / "merged" / "key")}
    assert (tmp_path / "cache" / "merged" / "key" / "model.safetensors").read_bytes() == b"weights"
