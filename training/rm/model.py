"""The reward model: a VLM backbone with a Linear(hidden, 1) head, and its checkpoint format.

    reward(x)   = head(h_T)       h_T: the backbone's last hidden state at the LAST NON-PAD token
    values(x)_t = head(h_t)       per token: the PPO critic, initialised from a trained reward model

With --length_head (ODIN) a second Linear(hidden, 1), the length head, is trained beside it (training.rm.trainer);
`head` is then ODIN's quality head, the only one anything reads after training.

The backbone is whatever `load_model_and_processor` builds (every supported architecture, full,
LoRA or QLoRA); the head reads the decoder's final hidden states, so the language-model head
(vocabulary projection) is never run and stays frozen.

Checkpoint = a normal builder checkpoint (`save_model`: full weights, or LoRA adapters) of the
backbone + `value_head.safetensors` (+ `length_head.safetensors`) + `reward_model.json`. `load_reward_model` reloads it, frozen
for scoring (reward model, best-of-n) or trainable (critic initialisation, more RM training).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from training.config import LoraArgs, ModelArgs

HEAD_FILE = "value_head.safetensors"
LENGTH_HEAD_FILE = "length_head.safetensors"
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


def new_head(hidden: int) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1)
    # small init: rewards start near 0 (seeded by the caller, identical on every rank)
    torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
    torch.nn.init.zeros_(head.bias)
    return head


class RewardModel(torch.nn.Module):
    def __init__(self, backbone, factual: bool = False, head: torch.nn.Linear | None = None,
                 length_head: bool | torch.nn.Linear = False):
        super().__init__()
        self.backbone = backbone
        self.factual = factual
        hidden = text_hidden_size(backbone)
        self.value_head = head if head is not None else new_head(hidden)
        # ODIN's length head (training only; None: a plain reward model)
        self.length_head = new_head(hidden) if length_head is True else (length_head or None)
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

    def packed_states(self, packed, read_at: torch.Tensor) -> torch.Tensor:
        """(S, H) final decoder states at `read_at` of a packed batch (training.dpo.data.PrefixBatch: DPO's
        shared-prefix layout, one row, each list's prefix computed once; training.rm.data.pack_lists)."""
        from training.dpo.forward import mrope_position_ids
        from training.dpo.packed import use_prefix_attention

        use_prefix_attention(self.backbone)
        inputs = packed.model_inputs()
        inputs.pop("logits_to_keep")  # the decoder alone runs: no logits
        if packed.rope is not None:
            inputs["position_ids"] = mrope_position_ids(self.backbone, packed)
        return base_model(self.backbone).model(**inputs).last_hidden_state[0].index_select(0, read_at)

    def forward(self, input_ids=None, attention_mask=None, per_token: bool = False, with_length: bool = False,
                packed=None, read_at=None, **vision) -> torch.Tensor:
        """(B,) float32 rewards, read at each row's last non-pad token; per_token: the (B, T) values (the critic's);
        with_length: ((B, 2), ()) the quality head's reward and the length head's, and the dot product of their
        weights (ODIN's training). packed, read_at (training.rm.data.RankedBatch's fast path): the rewards read at
        `read_at` of the packed row instead.
        Through forward, not `values`, under ZeRO-3: DeepSpeed starts each step of its parameter prefetching at the
        model's forward, and a critic called by `values` never got past recording (no prefetch)."""
        if with_length and self.length_head is None:
            raise ValueError("with_length: this reward model has no length head (--length_head)")
        if per_token:
            if packed is not None:
                raise ValueError("per_token values are read from padded rows, not a packed batch")
            return self.values(input_ids, attention_mask, **vision)
        if packed is not None:
            h = self.packed_states(packed, read_at)
        else:
            h = self.hidden_states(input_ids, attention_mask, **vision)
            h = h.gather(1, last_token_index(attention_mask)[:, None, None].expand(-1, 1, h.shape[-1])).squeeze(1)
        h = h.to(self.value_head.weight.dtype)
        if with_length:
            # the heads' weights read here, in this module's forward: ZeRO-3 gathers them for it
            dot = self.value_head.weight.float().flatten() @ self.length_head.weight.float().flatten()
            return torch.cat([self.value_head(h), self.length_head(h)], -1).float(), dot
        return self.value_head(h).squeeze(-1).float()

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
        info = {"kind": "reward_model", "hidden_size": self.value_head.in_features, "factual": self.factual,
                "head_file": HEAD_FILE, "read_at": "last non-pad token"}
        for name, module, file in (("value_head", self.value_head, HEAD_FILE),
                                   ("length_head", self.length_head, LENGTH_HEAD_FILE)):
            if module is None:
                continue
            head = part(f"{name}.") or module.state_dict()
            save_tensors({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.items()},
                         out_dir / file)
        if self.length_head is not None:  # ODIN: the head file above is its quality head
            info["length_head_file"] = LENGTH_HEAD_FILE
        (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))


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


def head_file(path: str | Path, info: dict, key: str = "head_file") -> str | None:
    """The head's file name that a reward model's record (`info`, read from path/INFO_FILE) gives under `key`
    (head_file: the reward's head; length_head_file: ODIN's length head, None where there is none): a name in its
    folder, not a path out of it (a checkpoint from elsewhere would load a file from outside, and merge_lora copy it
    to the same place outside its output folder)."""
    name = info.get(key, HEAD_FILE if key == "head_file" else None)
    if name is None and key != "head_file":
        return None
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"{Path(path) / INFO_FILE}: {key} {name!r} is not a file name in the checkpoint's folder")
    return name


def head_files(path: str | Path, info: dict) -> list[str]:
    """Every head file a reward model's record names (the reward's head first)."""
    return [n for key in ("head_file", "length_head_file") if (n := head_file(path, info, key)) is not None]


def _read_head(path: Path, module: torch.nn.Linear, info: dict) -> dict:
    from safetensors.torch import load_file
    head = load_file(str(path))
    want = {k: list(v.shape) for k, v in module.state_dict().items()}
    got = {k: list(v.shape) for k, v in head.items()}
    if got != want:  # (torch's own error names neither the file nor why)
        raise ValueError(f"{path}: not a value head of this backbone (hidden size {module.in_features}; "
                         f"the head was saved for {info.get('hidden_size')}): it needs {want}, the file holds {got}")
    return head


def load_reward_model(path: str | Path, model_args: ModelArgs | None = None, lora_args: LoraArgs | None = None,
                      *, for_training: bool = False, zero3: dict | None = None, length_head: bool = False):
    """-> (RewardModel, processor, arch_spec) from a checkpoint written by `RewardModel.save_pretrained`.

    for_training=False: frozen, eval mode (the PPO reward model, best-of-n). for_training=True: the
    builder's training path (freeze flags, LoRA / QLoRA from `lora_args`) plus a trainable head, e.g.
    the PPO critic. `model_args` supplies precision and freeze options; its checkpoint is `path`. zero3: as
    `load_model_and_processor`'s (the backbone is built partitioned; the small head is partitioned by DeepSpeed).
    length_head (more ODIN training of a reward model): its length head too, a new one where it has none; otherwise
    an ODIN reward model loads as its quality head alone, which is what anything but its training reads."""
    from training.model.builder import eval_mode, load_model_and_processor, torch_dtype

    path = Path(path)
    info = reward_model_info(path)
    head_files(path, info)  # before the backbone loads
    margs = dataclasses.replace(model_args or ModelArgs(), from_checkpoint=str(path))
    backbone, processor, spec = load_model_and_processor(margs, lora_args or LoraArgs(), for_training=for_training,
                                                          zero3=zero3)
    rm = RewardModel(backbone, factual=bool(info.get("factual", False)), length_head=length_head)
    rm.value_head.load_state_dict(_read_head(path / head_file(path, info), rm.value_head, info))
    if length_head and (name := head_file(path, info, "length_head_file")) is not None:
        rm.length_head.load_state_dict(_read_head(path / name, rm.length_head, info))
    # the head computes in the backbone's precision, as in training (DeepSpeed cast it with the backbone): an fp32 head
    # on a bf16 backbone gave other rewards than the training run's evaluation
    for head in (rm.value_head, rm.length_head):
        if head is not None:
            head.to(torch_dtype(margs.precision))
    if not for_training:
        rm.requires_grad_(False)
        eval_mode(rm)
    return rm, processor, spec
