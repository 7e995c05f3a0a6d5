"""The reward model: a VLM backbone with a Linear(hidden, 1) head, and its checkpoint format.

    reward(x)   = head(h_T)       h_T: the backbone's last hidden state at the LAST NON-PAD token
    values(x)_t = head(h_t)       per token: the PPO critic, initialised from a trained reward model

The backbone is whatever `load_model_and_processor` builds (every supported architecture, full,
LoRA or QLoRA); the head reads the decoder's final hidden states, so the language-model head
(vocabulary projection) is never run and stays frozen.

Checkpoint = a normal builder checkpoint (`save_model`: full weights, or LoRA adapters) of the
backbone + `value_head.safetensors` + `reward_model.json`. `load_reward_model` reloads it, frozen
for scoring (reward model, best-of-n) or trainable (critic initialisation, more RM training).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from training.config import LoraArgs, ModelArgs

HEAD_FILE = "value_head.safetensors"
INFO_FILE = "reward_model.json"


def base_model(backbone):
    """The transformers *ForConditionalGeneration model under an optional peft wrapper."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def text_hidden_size(backbone) -> int:
    cfg = base_model(backbone).config
    return (getattr(cfg, "text_config", None) or cfg).hidden_size


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position of each row; right or left padding alike."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.flip(-1).long().argmax(-1)


class RewardModel(torch.nn.Module):
    def __init__(self, backbone, factual: bool = False, head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.factual = factual
        hidden = text_hidden_size(backbone)
        if head is None:
            head = torch.nn.Linear(hidden, 1)
            # small init: rewards start near 0 (seeded by the caller, identical on every rank)
            torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(head.bias)
        self.value_head = head
        base = base_model(backbone)
        lm_head, embed = base.get_output_embeddings(), base.get_input_embeddings()
        if lm_head is not None and lm_head.weight is not getattr(embed, "weight", None):
            lm_head.requires_grad_(False)  # never run: no optimizer state for it (a tied one stays as is)

    def hidden_states(self, input_ids, attention_mask, **vision) -> torch.Tensor:
        """(B, T, H) final (normed) decoder states; padding is masked out of attention."""
        out = base_model(self.backbone).model(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False, **vision)
        return out.last_hidden_state

    def values(self, input_ids, attention_mask, **vision) -> torch.Tensor:
        """(B, T) float32 per-token values (critic); position t has read tokens 0..t."""
        h = self.hidden_states(input_ids, attention_mask, **vision)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids, attention_mask, per_token: bool = False, **vision) -> torch.Tensor:
        """(B,) float32 rewards, read at each row's last non-pad token; per_token: the (B, T) values (the critic's).
        Through forward, not `values`, under ZeRO-3: DeepSpeed starts each step of its parameter prefetching at the
        model's forward, and a critic called by `values` never got past recording (no prefetch)."""
        v = self.values(input_ids, attention_mask, **vision)
        return v if per_token else v.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    # ---- checkpoint --------------------------------------------------------------------------
    def save_pretrained(self, out_dir, safe_serialization: bool = True, state_dict: dict | None = None, **_) -> None:
        """Called by `builder.save_model` (hence by `Strategy.save_hf`, which under ZeRO-3 gathers the parameters
        or passes them gathered as `state_dict`): backbone as a normal checkpoint, then the head and its
        description."""
        from training.files import save_tensors
        from training.model.builder import save_model

        def part(prefix):
            return None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items()
                                                    if k.startswith(prefix)}
        out_dir = Path(out_dir)
        save_model(self.backbone, None, out_dir, state_dict=part("backbone."))
        head = part("value_head.") or self.value_head.state_dict()
        head = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.items()}
        save_tensors(head, out_dir / HEAD_FILE)
        (out_dir / INFO_FILE).write_text(json.dumps({
            "kind": "reward_model", "hidden_size": self.value_head.in_features, "factual": self.factual,
            "head_file": HEAD_FILE, "read_at": "last non-pad token"}, indent=1))


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / INFO_FILE).is_file()


def refuse_non_reward_model(path: str, flag: str) -> None:
    """A folder given where a reward model is read (PPO's --reward_model / --critic_init, predict's --reward_model)
    that is none (the SFT model, say): a FileNotFoundError traceback from reward_model_info once the policy had
    loaded. Refused before any model loads."""
    if path and not is_reward_model(path):
        raise SystemExit(f"--{flag} {path}: not a reward model (no {INFO_FILE}); give the output of "
                         "`bash run_rm_training.sh`")


def refuse_reward_model_as_policy(path: str, flag: str) -> None:
    """A reward model's folder holds its backbone as an ordinary VLM checkpoint: given where a stage wants the SFT
    policy (its actor, reference) it loaded and trained without a word. Refused before any model loads."""
    if path and is_reward_model(path):
        raise SystemExit(f"--{flag} {path}: a reward model (it holds {INFO_FILE}); give the SFT model "
                         "(run_sft.sh's output) here, and the reward model as PPO's --reward_model")


def reward_model_info(path: str | Path) -> dict:
    """A reward model checkpoint's record (INFO_FILE: whether it is factual, its head's file, ...)."""
    path = Path(path)
    if not is_reward_model(path):
        raise FileNotFoundError(f"{path}: not a reward model checkpoint (no {INFO_FILE}); train one with "
                                "`bash run_rm_training.sh`")
    return json.loads((path / INFO_FILE).read_text())


def head_file(path: str | Path, info: dict) -> str:
    """The head's file name that a reward model's record (`info`, read from path/INFO_FILE) gives: a name in its
    folder, not a path out of it (a checkpoint from elsewhere would load a file from outside, and merge_lora copy it
    to the same place outside its output folder)."""
    name = info.get("head_file", HEAD_FILE)
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"{Path(path) / INFO_FILE}: head_file {name!r} is not a file name in the checkpoint's folder")
    return name


def load_reward_model(path: str | Path, model_args: ModelArgs | None = None, lora_args: LoraArgs | None = None,
                      *, for_training: bool = False, zero3: dict | None = None):
    """-> (RewardModel, processor, arch_spec) from a checkpoint written by `RewardModel.save_pretrained`.

    for_training=False: frozen, eval mode (the PPO reward model, best-of-n). for_training=True: the
    builder's training path (freeze flags, LoRA / QLoRA from `lora_args`) plus a trainable head, e.g.
    the PPO critic. `model_args` supplies precision and freeze options; its checkpoint is `path`. zero3: as
    `load_model_and_processor`'s (the backbone is built partitioned; the small head is partitioned by DeepSpeed)."""
    from safetensors.torch import load_file

    from training.model.builder import eval_mode, load_model_and_processor, torch_dtype

    path = Path(path)
    info = reward_model_info(path)
    head_file(path, info)  # before the backbone loads
    margs = dataclasses.replace(model_args or ModelArgs(), from_checkpoint=str(path))
    backbone, processor, spec = load_model_and_processor(margs, lora_args or LoraArgs(), for_training=for_training,
                                                          zero3=zero3)
    rm = RewardModel(backbone, factual=bool(info.get("factual", False)))
    head_path = path / head_file(path, info)
    head = load_file(str(head_path))
    want = {k: list(v.shape) for k, v in rm.value_head.state_dict().items()}
    got = {k: list(v.shape) for k, v in head.items()}
    if got != want:  # (torch's own error names neither the file nor why)
        raise ValueError(f"{head_path}: not a value head of this backbone (hidden size {rm.value_head.in_features}; "
                         f"the head was saved for {info.get('hidden_size')}): it needs {want}, the file holds {got}")
    rm.value_head.load_state_dict(head)
    # the head computes in the backbone's precision, as in training (DeepSpeed cast it with the backbone): an fp32 head
    # on a bf16 backbone gave other rewards than the training run's evaluation
    rm.value_head.to(torch_dtype(margs.precision))
    if not for_training:
        rm.requires_grad_(False)
        eval_mode(rm)
    return rm, processor, spec
