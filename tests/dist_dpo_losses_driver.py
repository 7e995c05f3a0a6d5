"""Run by tests/test_dpo_losses_distributed.py under `deepspeed --num_accelerators 2`: ORPO at ZeRO 0 to 3,
OPA-DPO's DPO step at ZeRO 0 and 3 and listwise DPO over lists of unequal size at ZeRO 3, each rank with half of
a batch of 4."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dist_dpo_driver import dpo_args  # noqa: E402

# SGD without clipping: the update is the gradient (a clipped one is its direction alone)
SGD = ("--max_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.2", "--max_grad_norm", "0")


def runs(out: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(name, arguments) of each run; the data files are written by the test before the launch."""
    orpo = ("--loss_type", "orpo")
    opa = ("--loss_type", "opa", "--data_path", str(out / "pairs.json"))
    listwise = ("--loss_type", "listwise", "--data_path", str(out / "mixed.json"))
    return [("orpo", orpo), ("opa", opa), ("listwise", listwise)]


STAGES = {"orpo": (0, 1, 2, 3), "opa": (0, 3), "listwise": (3,)}

if __name__ == "__main__":
    from training.dpo.main import main

    world, tiny, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    for name, args in runs(out):
        for stage in STAGES[name]:
            main(dpo_args(world, tiny, out / f"{name}{stage}", *args, *SGD, "--zero_stage", str(stage),
                          "--per_device_train_batch_size", "2", "--ref_cache_dir", str(out / f"cache_{name}{stage}")))
