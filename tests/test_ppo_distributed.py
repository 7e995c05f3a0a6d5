"""PPO on two CPU ranks at ZeRO 0, 1, 2 and 3: rollouts of different lengths per rank must not hang (ZeRO-3
generation gathers the whole actor on each rank, or with --no-gather_for_generation, as the LoRA run, keeps every rank
in the per-module gathers) and every stage saves an actor; at
ZeRO-3 with the PPO-ptx term on; and LoRA and QLoRA actors at ZeRO-3, whose reference is the actor with adapters off."""
import json

from sft_helpers import make_reward_model, run_two_ranks


def test_ppo_zero_stages_on_two_ranks(world, tiny, tmp_path):
    rm = make_reward_model(tiny, tmp_path / "rm")
    run_two_ranks("dist_ppo_driver.py", world, tiny, rm, tmp_path)
    for stage in range(4):
        out = tmp_path / f"zero{stage}"
        assert (out / "model.safetensors").exists(), stage
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert row["response_length"] > 0 and row["kl"] == row["kl"]
        assert ("ptx_loss" in row) == (stage == 3)  # ZeRO-3 also runs the PPO-ptx term's extra forwards
    lora = [json.loads(x) for x in (tmp_path / "zero3_lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lora] == [1, 2] and abs(lora[0]["kl"]) < 1e-5  # before any update: actor = reference
    assert (tmp_path / "zero3_lora" / "adapter" / "adapter_config.json").exists()
    q = json.loads((tmp_path / "zero3_qlora" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(q["kl"]) < 1e-5 and q["value_loss"] == q["value_loss"]
    assert (tmp_path / "zero3_qlora" / "adapter" / "adapter_config.json").exists()
    for rank in (0, 1):  # the LoRA reference (adapters off, projector and vision tower at their start) at ZeRO-3
        r = json.loads((tmp_path / f"lora_reference_rank{rank}.json").read_text())
        assert r["reference_vs_start"] < 1e-5 and r["moved_vs_start"] > 1e-3 and r["after_vs_before"] == 0.0, r
