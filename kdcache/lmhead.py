"""A causal LM's own way from its last hidden state to its logits, split off its body, so that the output layer can
run on some positions only: a chunk of them at a time in capture (capture/logits.py) and in a chat student's loss
(train/lm_losses.py), at the response positions only (train/chat.py). Shared by both stages; no other kdcache import."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Bytes of float32 logits per chunk when a chunk is left to kdcache (`cache.logit_chunk: 0`; stage two's chat loss):
# about 3 such tensors are live at once (the logits, one tempered copy, and a softmax or its gradient).
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}


def chunk_positions(setting: int, vocab: int, device: torch.device) -> int:
    """Positions per chunk: `setting` when > 0, else what fits the device's CHUNK_BYTES of float32 logits."""
    if setting > 0:
        return setting
    return max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * vocab))


class OutputHead:
    """The model's own way from its last hidden state to its logits, split off the body so it can run on a chunk:
    the output embedding, then the final soft-capping where the config has one. `check` compares it with the
    model's full forward on a probe; a model whose head does something else is run unchunked (with a warning)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.body = model.base_model
        self.linear = model.get_output_embeddings()
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.usable = self.body is not model and self.linear is not None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden state [B, L, H] for token ids [B, L]."""
        return self.body(input_ids=x).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (the autocast dtype) for hidden states [..., H]."""
        z = self.linear(h)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def check(self, model: torch.nn.Module, x: torch.Tensor) -> bool:
        """Whether the split head gives the model's own logits on the probe ids x [1, l] (to float32 rounding)."""
        if not self.usable:
            return False
        try:
            want = model(input_ids=x).logits.float()
            got = self.logits(self.hidden(x)).float()
        except Exception as e:  # noqa: BLE001 - any failure means: not splittable, use the full forward
            log.warning("the teacher's output layer could not be run on its own (%s)", e)
            return False
        return want.shape == got.shape and torch.allclose(want, got, rtol=1e-5, atol=1e-5)
