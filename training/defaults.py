"""What "no arguments" means: the embedded world as data and the tiny VLM as the starting model.

Rank 0 generates them once (deterministically, from seeds); the other ranks wait at a barrier.
"""
from __future__ import annotations

from pathlib import Path

from training.config import DataArgs, ModelArgs

TINY_INIT = "output/tiny_vlm_init"


def resolve_defaults(model: ModelArgs, data: DataArgs, strategy, train_file: str, eval_file: str = "") -> None:
    """Fill empty --from_checkpoint / --data_path / --image_folder with the embedded defaults."""
    if not data.data_path or (eval_file and not data.eval_data_path):
        if strategy.is_main:
            from training.world.generate import ensure_world
            ensure_world(data.world_dir, data.world_seed)
        strategy.barrier()
        world = Path(data.world_dir)
        if not data.data_path:
            data.data_path = str(world / train_file)
            data.image_folder = data.image_folder or str(world / "images")
        if eval_file and not data.eval_data_path:
            data.eval_data_path = str(world / eval_file)
    if not model.from_checkpoint and not (model.vision_tower and model.language_model):
        if strategy.is_main:
            from training.model.tiny import ensure_tiny_vlm
            ensure_tiny_vlm(TINY_INIT)
        strategy.barrier()
        model.from_checkpoint = TINY_INIT
