"""The PyTorch side of `python -m cgpt_jax.bench --compare=torch`: a nanoGPT-style module with the same
architecture and the same training step as cgpt_jax's standard (SP) model, run eagerly.

Same as cgpt_jax: pre-LayerNorm blocks, learned positions, LM head tied to the token embedding, exact
(erf) GELU, biases everywhere, causal softmax attention (`scaled_dot_product_attention`, the fastest
eager path, as nanoGPT uses), mean cross-entropy, global-norm clipping, then AdamW with decay on
matrices and embeddings only. Only the torch extra needs to be installed (`pip install -e .[torch]`).
"""
from __future__ import annotations

import math
import time

import ml_collections
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cgpt_jax.bench.runners import Stepper


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(d_model, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ln_mlp = nn.LayerNorm(d_model, eps=eps)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def attention(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x_BxLxD.shape
        q, k, v = self.qkv(x_BxLxD).split(d_model, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y_BxHxLxK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_out(y_BxHxLxK.transpose(1, 2).reshape(batch, length, d_model))

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        x_BxLxD = x_BxLxD + self.attention(self.ln_attn(x_BxLxD))
        return x_BxLxD + self.down(F.gelu(self.up(self.ln_mlp(x_BxLxD))))


class TorchGPT(nn.Module):
    def __init__(self, m: ml_collections.ConfigDict):
        super().__init__()
        self.wte = nn.Embedding(m.vocab_size, m.d_model)
        self.wpe = nn.Embedding(m.max_seq_len, m.d_model)
        self.blocks = nn.ModuleList(Block(m.d_model, m.n_heads, m.d_ff, m.layer_norm_eps)
                                    for _ in range(m.n_layers))
        self.ln_f = nn.LayerNorm(m.d_model, eps=m.layer_norm_eps)
        output_std = m.output_init_std if m.output_init_std > 0 else m.init_std / math.sqrt(2 * m.n_layers)
        for name, p in self.named_parameters():  # as cgpt_jax: truncated N(0, std²), output layers scaled down
            if p.dim() >= 2:
                std = output_std if name.endswith(("attn_out.weight", "down.weight")) else m.init_std
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
        x_BxLxD = self.wte(tokens_BxL) + self.wpe.weight[:tokens_BxL.shape[1]]
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        return self.ln_f(x_BxLxD) @ self.wte.weight.T  # tied LM head


class TorchTrainer:
    """One training step of TorchGPT on a fixed batch: forward, loss, backward, clip, AdamW."""

    def __init__(self, config: ml_collections.ConfigDict, tokens_BxL1: torch.Tensor, seed: int = 0):
        if config.model.parameterization != "sp" or config.model.attention not in ("dense", "fused"):
            raise ValueError("the PyTorch reference implements the standard parameterization with dense "
                             "attention (`dense`, or `fused`, which computes the same); compare with "
                             "--config.model.parameterization=sp --config.model.attention=fused")
        torch.manual_seed(seed)
        t = config.train
        self.model = TorchGPT(config.model)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.peak_lr, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps, foreach=True)
        self.clip = t.grad_clip_norm
        self.inputs_BxL, self.targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]

    def params_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        logits_BxLxV = self.model(self.inputs_BxL)
        loss = F.cross_entropy(logits_BxLxV.flatten(0, 1), self.targets_BxL.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        return loss.item()  # waits for the step, like the JAX stepper reading its loss


def peak_memory(trainer: TorchTrainer) -> tuple[int | None, str]:
    """Peak bytes of one training step: parameters, gradients, optimizer state, activations, temporaries."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        trainer.step()
        return torch.cuda.max_memory_allocated(), "CUDA allocator peak"
    try:  # CPU tensors have no allocator statistics; PyTorch's tracker follows every tensor's storage
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None, "unavailable (no torch.distributed._tools.mem_tracker)"
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    with tracker:
        trainer.step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]), "PyTorch MemTracker peak"


def torch_stepper(config: ml_collections.ConfigDict, tokens_BxL1: np.ndarray):
    """The same training step in eager PyTorch, as a `Stepper` (cgpt_jax/bench/runners.py)."""
    trainer = TorchTrainer(config, torch.from_numpy(tokens_BxL1.astype(np.int64)))
    start = time.perf_counter()
    trainer.step()
    first_step_s = time.perf_counter() - start
    peak, source = peak_memory(trainer)  # an extra, untimed step
    return Stepper("pytorch_eager", trainer.step, 0.0, first_step_s, peak, source, trainer.params_count())
