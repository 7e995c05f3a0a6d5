"""training/engine/ds_config.py's pure parts, without an engine: the trained model's batch sizes on several ranks,
and a frozen model's ZeRO-3 config (tests/test_strategy.py covers the user config against the flags)."""
from training.config import DeepSpeedArgs, OptimArgs
from training.engine.ds_config import engine_config, frozen_engine_config


def test_the_global_batch_counts_every_rank():
    """micro-batch 4 x accumulation 3 on 2 ranks: 24 samples a step (DeepSpeed checks the three agree)."""
    o = OptimArgs(per_device_train_batch_size=4, gradient_accumulation_steps=3)
    cfg = engine_config(DeepSpeedArgs(), o, "fp32", {}, world_size=2)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        4, 3, 24)


def test_a_frozen_model_is_partitioned_as_the_run_offloaded_where_it_offloads_parameters_in_its_precision():
    """The reference / reward model at ZeRO-3: offloaded to the CPU with --offload or a user config's offload_param
    (never to its NVMe folder), the user's other ZeRO settings kept but optimizer offload (a frozen model has no
    optimizer), and the run's bf16 section (zero.Init builds the partitions in that dtype)."""
    run = {"bf16": {"enabled": True}, "gradient_clipping": 1.0}
    user = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/swap"},
                                  "offload_optimizer": {"device": "cpu"}, "stage3_prefetch_bucket_size": 10}}
    cfg = frozen_engine_config(DeepSpeedArgs(zero_stage=3), user, run)
    assert cfg == {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}, "stage3_prefetch_bucket_size": 10}}
    assert frozen_engine_config(DeepSpeedArgs(zero_stage=3, offload=True), {}, {})["zero_optimization"] == {
        "stage": 3, "offload_param": {"device": "cpu"}}
    assert frozen_engine_config(DeepSpeedArgs(zero_stage=3), {}, {"fp16": {"enabled": True}}) == {
        "train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}
