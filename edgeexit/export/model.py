"""``EarlyExitModel``: a backbone cut into stages, with an optional exit after each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ModelSpecError

Carry = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(carry: Carry) -> tuple[torch.Tensor, ...]:
    """A stage's output as a tuple of tensors (a bare tensor becomes a 1-tuple)."""
    if isinstance(carry, torch.Tensor):
        return (carry,)
    if isinstance(carry, (tuple, list)) and carry and all(isinstance(t, torch.Tensor) for t in carry):
        return tuple(carry)
    raise ModelSpecError(
        f"a stage must return a tensor or a non-empty tuple of tensors, got {type(carry).__name__}"
    )


class EarlyExitModel(nn.Module):
    """Stages and exits of an early-exit network, as torch modules.

    Stage 0 receives the model inputs (positional, in the order of ``example_inputs``);
    stage k receives stage k-1's carry (a tensor, or a tuple unpacked as arguments) and
    returns the next carry.  Exit k receives stage k's carry the same way and returns
    logits of shape (batch, classes).  Every exit but the last may be ``None``.

    ``signals`` names what every exit head returns after its logits, for policies that score
    more than the logits (package format version 8): ``("halt",)`` for PALBERT's halting
    probability (``q_exit``), ``("gate",)`` for JEI-DNN's gate value (``gate``).  A head then
    returns the tuple ``(logits, *signals)``, each signal of shape (batch, 1).

    ``reads`` changes what a stage receives: ``"inputs"`` (the model inputs) or the index
    of any earlier stage whose carry it takes.  A pipeline such as CBNet uses it to run
    its fallback stages on the original image rather than on the converted one.

    Example:
        >>> model = EarlyExitModel(stages=[s0, s1], exits=[e0, e1])   # doctest: +SKIP
        >>> all_logits = model(x)                                       # doctest: +SKIP
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        exits: Sequence[nn.Module | None],
        reads: Sequence[str | int] | None = None,
        signals: Sequence[str] = (),
    ) -> None:
        super().__init__()
        from ..policies import SIGNALS

        unknown = [s for s in signals if s not in SIGNALS]
        if unknown or len(set(signals)) != len(signals):
            raise ModelSpecError(f"signals must be distinct names among {list(SIGNALS)}; got {list(signals)}")
        self.signals: tuple[str, ...] = tuple(signals)
        if len(stages) == 0:
            raise ModelSpecError("an EarlyExitModel needs at least one stage")
        if len(stages) != len(exits):
            raise ModelSpecError(
                f"got {len(stages)} stages and {len(exits)} exits; pass one exit per stage, using None "
                "for a stage without an exit"
            )
        if exits[-1] is None:
            raise ModelSpecError("the last stage needs an exit: it is the final classifier and always accepts")
        for kind, items in (("stage", stages), ("exit", exits)):
            for i, m in enumerate(items):
                if m is not None and not isinstance(m, nn.Module):
                    raise ModelSpecError(f"{kind} {i} must be a torch.nn.Module, got {type(m).__name__}")
        self.reads: list[str | int] = list(reads) if reads is not None else ["inputs", *range(len(stages) - 1)]
        if len(self.reads) != len(stages):
            raise ModelSpecError(f"reads needs one entry per stage ({len(stages)}), got {len(self.reads)}")
        for k, source in enumerate(self.reads):
            if source != "inputs" and not (isinstance(source, int) and 0 <= source < k):
                raise ModelSpecError(
                    f"reads[{k}] is {source!r}; a stage reads 'inputs' or the index of an earlier stage (0..{k - 1})"
                )
        self.stages = nn.ModuleList(stages)
        self.exit_modules = nn.ModuleList([e for e in exits if e is not None])
        self.exit_stage_indices: list[int] = [i for i, e in enumerate(exits) if e is not None]
        for k in range(len(stages)):
            if exits[k] is None and k not in self.reads:
                raise ModelSpecError(f"stage {k} has no exit and no later stage reads its carry: it would be dead")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stage_indices)

    def exit_at(self, stage_index: int) -> nn.Module | None:
        """The exit attached to a stage, or None."""
        if stage_index in self.exit_stage_indices:
            return self.exit_modules[self.exit_stage_indices.index(stage_index)]
        return None

    def stage_args(self, k: int, inputs: tuple[torch.Tensor, ...],
                   carries: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """What stage ``k`` receives, given the model inputs and the carries so far."""
        source = self.reads[k]
        return inputs if source == "inputs" else carries[source]  # type: ignore[index]

    def forward(self, *inputs: torch.Tensor) -> list[Any]:
        """What every exit returns, in order (all stages run; for training): its logits, or
        ``(logits, *signals)`` for a model with signals."""
        carries: list[tuple[torch.Tensor, ...]] = []
        outs = []
        for k, stage in enumerate(self.stages):
            carries.append(as_tuple(stage(*self.stage_args(k, inputs, carries))))
            head = self.exit_at(k)
            if head is not None:
                outs.append(head(*carries[k]))
        return outs
