"""Llama-3.2-Vision (mllama): a sample with no image reads none in a batch with images.

transformers' cross-attention layer masks a text row that attends to no image out of its MLP branch only: the
row's attention mask, all -inf, is reset to 0 and the row attends to every vision token of its sample (the
reference implementation masks the attention output too; transformers issue 39379). A text-only sample alone
skips those layers (no pixel inputs); batched with samples with images it read its zero-padded images, so its
log-probs, loss and answers depended on its batch. The samples whose cross_attention_mask marks no image get no
cross-attention output; samples with images are computed as transformers computes them."""
from __future__ import annotations


def mask_imageless_samples(model) -> None:
    """Hooks on `model` (any model; a no-op unless it holds mllama's cross-attention layers): each layer notes,
    as it is called (again when a gradient checkpoint recomputes it), which samples have a row attending to an
    image (its full_text_row_masked_out_mask), and its cross-attention output is zeroed for the others. A
    forward without images skips these layers in transformers and is left as it is."""
    for layer in (m for m in model.modules() if type(m).__name__ == "MllamaCrossAttentionDecoderLayer"):
        layer.register_forward_pre_hook(_note_samples_with_images, with_kwargs=True)
        layer.cross_attn.register_forward_hook(_zero_imageless(layer))


def _note_samples_with_images(layer, args, kwargs):
    rows = kwargs.get("full_text_row_masked_out_mask")  # (B, 1, T, 1): 1 where a text row attends to an image
    layer._samples_with_images = None if rows is None else rows.flatten(1).ne(0).any(1)


def _zero_imageless(layer):
    def hook(module, args, output):
        keep = getattr(layer, "_samples_with_images", None)
        if keep is None or bool(keep.all()):
            return None
        out = output[0] if isinstance(output, tuple) else output
        out = out * keep.to(device=out.device, dtype=out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return (out, *output[1:]) if isinstance(output, tuple) else out
    return hook
