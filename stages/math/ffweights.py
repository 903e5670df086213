"""The family-neutral feed-forward block every method works on: :class:`FFWeights`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class FFWeights:
    """One feed-forward block (a dense MLP, one expert or a shared expert), family-neutral.

    ``y = down @ act(gate @ x) * (up @ x + b_up)`` for GLU blocks (``gate`` set), else
    ``y = down @ act(up @ x + b_up) + b_down``. Row ``i`` of ``up``/``gate`` and column ``i`` of
    ``down`` together form intermediate neuron ``i`` (one "sub-MLP").

    Shapes: ``up`` [I, H], ``gate`` [I, H] or None, ``b_up`` [I] or None, ``down`` [H, I],
    ``b_down`` [H] or None.
    """

    up: Tensor
    down: Tensor
    act: str
    gate: Tensor | None = None
    b_up: Tensor | None = None
    b_down: Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return int(self.up.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.up.shape[1])

    @property
    def is_glu(self) -> bool:
        return self.gate is not None

    def num_params(self) -> int:
        return sum(t.numel() for t in (self.up, self.down, self.gate, self.b_up, self.b_down) if t is not None)

    def select(self, index: Tensor) -> FFWeights:
        """Keep (or reorder) intermediate neurons ``index`` [k] (a permutation when k == I)."""
        return replace(
            self,
            up=self.up[index],
            gate=None if self.gate is None else self.gate[index],
            b_up=None if self.b_up is None else self.b_up[index],
            down=self.down[:, index],
        )

    def hidden(self, x: Tensor) -> Tensor:
        """Input of the down projection, ``act(gate x) * up x`` or ``act(up x + b)``: [..., I]."""
        from transformers.activations import ACT2FN

        act = ACT2FN[self.act]
        u = torch.nn.functional.linear(x, self.up, self.b_up)
        if self.gate is None:
            return act(u)
        return act(torch.nn.functional.linear(x, self.gate)) * u

    def forward(self, x: Tensor) -> Tensor:
        """The block's output for ``x`` [..., H] -> [..., H]."""
        return torch.nn.functional.linear(self.hidden(x), self.down, self.b_down)

    def to(self, dtype: torch.dtype) -> FFWeights:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return replace(
            self, up=self.up.to(dtype), down=self.down.to(dtype), gate=cast(self.gate),
            b_up=cast(self.b_up), b_down=cast(self.b_down),
        )


def block_features(ff: FFWeights, x: Tensor, kinds: tuple[str, ...]) -> dict[str, Tensor]:
    """Features of one FF block for inputs ``x`` [n, H]: each [n, I] float32."""
    from transformers.activations import ACT2FN

    # In the model's compute precision (float32 inputs), not the stored one: a bfloat16 expert is
    # upcast here, one block at a time, as the runner's forward upcasts it.
    dt = torch.promote_types(x.dtype, ff.up.dtype)
    x = x.to(dt)
    up = torch.nn.functional.linear(x, ff.up.to(dt), None if ff.b_up is None else ff.b_up.to(dt))
    out: dict[str, Tensor] = {"up": up}
    if ff.gate is not None:
        gate = torch.nn.functional.linear(x, ff.gate.to(dt))
        out["gate"] = gate
        out["hidden"] = ACT2FN[ff.act](gate) * up
    else:
        out["hidden"] = ACT2FN[ff.act](up)
    return {k: v.float() for k, v in out.items() if k in kinds}

