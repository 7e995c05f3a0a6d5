"""DPO test helpers; run as a script by tests/test_dpo_distributed.py under `deepspeed --num_accelerators 2`
(DPO at ZeRO 0-3, and LoRA and QLoRA at ZeRO 3)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def dpo_args(world: Path, tiny: Path, out: Path, *extra: str, data: str = "preference_train.json") -> list[str]:
    return ["--from_checkpoint", str(tiny), "--data_path", str(world / data), "--image_folder", str(world / "images"),
            "--output_dir", str(out), "--no-progress", "--logging_steps", "1", "--num_warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--ref_cache_dir", str(out.parent / "ref_cache"),
            "--figure_dir", str(out / "figure"), "--sft_weight", "0", *extra]  # the losses as defined; the
    # stage's default added SFT term is tested on its own (test_dpo.py::test_default_adds_the_sft_term)


QLORA = ("--qlora", "--lora_r", "4", "--lora_dropout", "0", "--freeze_vision_tower")
DIST_COMMON = ("--max_steps", "2", "--per_device_train_batch_size", "2", "--optimizer", "sgd", "--learning_rate", "0.5")


def held_out_args(world: Path, out: Path) -> list[str]:
    """5 held-out pairs, eval batch 2: on two ranks one rank has 3 pairs (2 batches), the other 2 pairs (1 batch
    and 1 discarded, so both run the same number of forwards under ZeRO-3)."""
    import json
    path = out / "held_out5.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json.loads((world / "preference_heldout.json").read_text())[:5]))
    return ["--eval_data_path", str(path), "--eval_steps", "1", "--per_device_eval_batch_size", "2"]

if __name__ == "__main__":
    from training.dpo.main import main

    world, tiny, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    # each run computes its own reference cache (under its own ZeRO stage, split over the two ranks)
    for stage in (0, 1, 2, 3):
        main(dpo_args(world, tiny, out / f"zero{stage}", "--zero_stage", str(stage), *DIST_COMMON,
                      "--ref_cache_dir", str(out / f"cache{stage}"), *(held_out_args(world, out) if stage == 3 else [])))
    main(dpo_args(world, tiny, out / "lora_zero3", "--zero_stage", "3", "--lora_r", "4", "--lora_dropout", "0",
                  *DIST_COMMON, "--ref_cache_dir", str(out / "cache_lora")))
    main(dpo_args(world, tiny, out / "qlora_zero3", "--zero_stage", "3", *QLORA, *DIST_COMMON,
                  "--ref_cache_dir", str(out / "cache_qlora")))
