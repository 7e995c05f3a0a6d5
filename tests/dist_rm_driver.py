"""Run by tests/test_rm_distributed.py under `deepspeed --num_accelerators 2`: RM training at ZeRO 0-3."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_rm import DIST_ARGS, mixed_args, rm_args  # noqa: E402

from training.rm.main import main  # noqa: E402

world, tiny, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
for stage in (0, 1, 2, 3):
    main(rm_args(world, tiny, out / f"zero{stage}", "--zero_stage", str(stage), "--per_device_train_batch_size", "2",
                 *DIST_ARGS, *mixed_args(out / "mixed.json")))  # written by the test (test_rm.mixed_lists)
