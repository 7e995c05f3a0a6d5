"""Vision-language model alignment: SFT -> reward model -> PPO, or DPO / ORPO, on DeepSpeed."""
