"""Run by tests/test_ppo_ranks.py under `deepspeed --num_accelerators 2`: PPO at ZeRO 0 to 3 on two ranks, each with
half of a rollout batch of 4, greedy (sampling is seeded by rank, so only greedy rollouts are a rank split's
own) and with responses of unequal lengths."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_helpers import ppo_args  # noqa: E402

# reward model without its factual block (its facts are shuffled by rank); SGD: the update is the gradient
COMMON = ("--max_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.5", "--critic_learning_rate", "0.5",
          "--max_new_tokens", "8", "--max_grad_norm", "0", "--no-factual")


def greedy_cut_by_prompt() -> None:
    """Rollouts decoded greedily, each ended early at a length fixed by its prompt's image (a tiny model's greedy
    answers are all alike)."""
    import dataclasses

    import training.ppo.rollout as rollout
    import training.ppo.trainer as trainer
    real_rollouts, real_decode = rollout.generate_rollouts, trainer.DecodeArgs

    def cut_rollouts(model, *args, **kwargs):
        generate = model.generate

        def ended_early(**kw):
            out = generate(**kw).clone()
            n = kw["input_ids"].shape[1]
            for row in range(out.shape[0]):  # the prompts differ in their images
                cut = n + int(kw["pixel_values"][row].double().abs().sum() * 100) % (out.shape[1] - n)
                out[row, cut] = kw["eos_token_id"][0]
            return out
        model.generate = ended_early
        try:
            return real_rollouts(model, *args, **kwargs)
        finally:
            del model.generate
    trainer.generate_rollouts = cut_rollouts
    trainer.DecodeArgs = lambda **kw: dataclasses.replace(real_decode(**kw), do_sample=False)


if __name__ == "__main__":
    from training.ppo.main import main

    world, tiny, rm, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    greedy_cut_by_prompt()
    for stage in (0, 1, 2, 3):
        main(ppo_args(world, tiny, rm, out / f"zero{stage}", "--zero_stage", str(stage), "--rollout_batch_size", "2",
                      "--per_device_train_batch_size", "2", *COMMON))
