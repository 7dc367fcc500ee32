"""Exponential moving average of the student's weights, with a warmup so that early EMA weights are not
dominated by the random initialisation (an EMA of decay 0.9999 over a few thousand steps keeps most of it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        # A frozen weight (a LoRA student's base) never changes: its average is itself.
        seen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
        for k, v in model.state_dict().items():
            # A tied embedding appears under two names with one storage: average it once.
            # (A shard of a sharded student has no storage of its own: its local part's is the one to compare.)
            ptr = (v.to_local() if hasattr(v, "to_local") else v).data_ptr()
            if v.is_floating_point() and ptr not in seen:
                seen.add(ptr)
                self.shadow[k] = v.detach().float().clone()
        # counted on the device: whether a step counts is decided there (`update`)
        device = next(iter(self.shadow.values())).device if self.shadow else None
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def updates(self) -> int:
        return int(self._updates)

    def effective_decay(self) -> torch.Tensor:
        """Grows from 0 towards `decay`: (1 + n) / (10 + n) after n updates, capped at `decay` (fp64, on the
        device)."""
        n = self._updates.double()
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, stepped: torch.Tensor | None = None) -> None:
        """Call after each optimizer step. `stepped` (bool tensor on the device): False for a skipped step,
        which leaves the shadow weights and the update count as they are, without the host waiting for it."""
        d = self.effective_decay()
        counts = torch.ones((), dtype=torch.bool, device=d.device) if stepped is None else stepped
        weight = torch.where(counts, 1 - d, 0.0).float()
        params = model.state_dict()
        for k, s in self.shadow.items():
            s.lerp_(params[k].detach().float(), weight)
        self._updates += counts

    @contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Temporarily put the EMA weights into `model`; the raw weights come back afterwards."""
        _resharded(model)
        params = model.state_dict()
        raw = {k: params[k].detach().clone() for k in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            _resharded(model)
            for k, v in raw.items():
                params[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        _resharded(model)
        params = model.state_dict()
        for k, s in self.shadow.items():
            params[k].copy_(s.to(params[k].dtype))

    def state_dict(self) -> dict:
        """With a sharded student the shadow weights are gathered in full (every process must call it)."""
        shadow = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.shadow.items()}
        return {"decay": self.decay, "updates": self.updates, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self._updates.fill_(state["updates"])
        for k, v in state["shadow"].items():
            s = self.shadow[k]
            if hasattr(s, "device_mesh"):  # a shard of a sharded student: take this process's part
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(s.dtype), s.device_mesh, s.placements)
            s.copy_(v)


def _resharded(model: nn.Module) -> None:
    """A sharded (FSDP2) model keeps its root's weights gathered after a forward without gradients; the
    weights to read or overwrite are the shards, so put them back first."""
    if hasattr(model, "reshard"):
        model.reshard()
