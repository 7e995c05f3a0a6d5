"""VLMs built from parts with the language models whose layout differs from Llama's: Phi-3 (fused projections)
and Gemma-2 (final logit soft-capping in its own causal-LM head)."""
import torch
from test_builder import _load, _tiny_vision

from training.config import LoraArgs, ModelArgs
from training.model.builder import load_model_and_processor
from training.model.parts import build_from_parts
from training.model.tiny_archs import build_tokenizer

_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _composed(tmp_path, kind):
    """A tiny LM of `kind` (phi3 | gemma2) composed with a tiny CLIP tower -> (VLM checkpoint, LM, tokenizer)."""
    import transformers
    tok = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>"], add_bos="<s>", unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", pad_token="<pad>")
    name = {"phi3": "Phi3", "gemma2": "Gemma2"}[kind]
    extra = dict(head_dim=8, final_logit_softcapping=30.0) if kind == "gemma2" else {}
    cfg = getattr(transformers, f"{name}Config")(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                  **_SIZES, **extra)
    torch.manual_seed(0)
    lm = getattr(transformers, f"{name}ForCausalLM")(cfg)
    if kind == "gemma2":  # logits beyond the cap's linear range, as a trained model's are
        with torch.no_grad():
            lm.model.embed_tokens.weight.mul_(20)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    _tiny_vision("clip", tmp_path / "vision")
    return build_from_parts(str(tmp_path / "vision"), str(tmp_path / "lm"), tmp_path / "vlm"), lm.eval(), tok


def test_lora_auto_covers_a_phi3_language_models_fused_projections(tmp_path):
    """Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj): "auto" put adapters on o_proj and down_proj only."""
    out, _, _ = _composed(tmp_path, "phi3")
    model, _, spec = _load(out, LoraArgs(lora_r=4), freeze_vision_tower=True, freeze_projector=True)
    adapted = {n.split(".")[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    lora_modules = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert all(spec.param_group(n + ".weight") == "lm" for n in lora_modules)  # none on the vision tower


def test_a_composed_gemma2_computes_its_language_models_logits(tmp_path):
    """Gemma2ForCausalLM soft-caps its logits (30 tanh(logits / 30)); LLaVA's head does not: the composed VLM's
    text-only logits were not the language model's (max |logit| 10.04 against 9.68)."""
    out, lm, tok = _composed(tmp_path, "gemma2")
    ids = tok("red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
    assert float(expected.abs().max()) > 5  # where the cap bends the logits
    for lora in (LoraArgs(), LoraArgs(lora_r=4, lora_target_modules="q_proj,lm_head")):
        for training in (True, False):
            model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=out), lora, for_training=training)
            model.eval()
            with torch.no_grad():
                got = model(input_ids=ids).logits[..., :expected.shape[-1]]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
