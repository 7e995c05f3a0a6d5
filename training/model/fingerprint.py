"""A checkpoint's fingerprint: what loading it reads, by name, size and modification time.

One definition for every cache keyed by a model (the DPO reference log-probs, benchmark answers):
the weight, config, tokenizer, chat-template and model-code files of the folder and of its adapter/ subfolder,
and for a LoRA checkpoint its base model's in turn. Files our stages write beside a model that
loading never reads (run settings, bad rows, pipeline records, evaluation results, metrics) and
the checkpoints/, predictions/ and tensorboard/ folders are left out, so scoring a model or
rerunning the pipeline does not change it. A Hub id is its name and, where the local Hugging Face cache holds
it, the files of its current snapshot (blob names are content hashes: a new revision is another model); no
checkpoint means the embedded tiny VLM.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# (".py": a checkpoint's own model code, which trust_remote_code runs)
LOADED_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".jinja", ".model", ".txt", ".py")
WRITTEN_BESIDE = ("run_config.json", "bad_rows.json", "pipeline_stage.json")  # + eval_*.json


def loaded_files(folder: Path) -> list[Path]:
    from training.model.builder import ADAPTER_SUBDIR
    return [f for d in (folder, folder / ADAPTER_SUBDIR) if d.is_dir() for f in sorted(d.iterdir())
            if f.is_file() and f.suffix in LOADED_SUFFIXES and f.name not in WRITTEN_BESIDE
            and not f.name.startswith("eval_")]


def hub_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot folder of a Hub model id at its current revision (refs/main), or None."""
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError): a path that does not exist, say
        return None
    return Path(found).parent if isinstance(found, str) else None


def _stats(checkpoint: str) -> list:
    from training.model.builder import ADAPTER_SUBDIR, BUILD_INFO_FILE, embedded_tiny_vlm, recorded_base
    if not checkpoint:
        checkpoint = embedded_tiny_vlm()  # rebuilt first if its definition changed
    p = Path(checkpoint)
    if not p.is_dir():
        snapshot = hub_snapshot(checkpoint)
        return [checkpoint] + ([] if snapshot is None else _stats(str(snapshot)))
    out = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in loaded_files(p)]
    info = p / ADAPTER_SUBDIR / BUILD_INFO_FILE
    base = json.loads(info.read_text()).get("base") if info.is_file() else None
    base = recorded_base(base) if base else None
    if base and Path(base).resolve() != p.resolve():
        out.append(_stats(base))
    return out


def model_fingerprint(checkpoint: str | Path) -> str:
    return hashlib.sha256(json.dumps(_stats(str(checkpoint))).encode()).hexdigest()[:16]
