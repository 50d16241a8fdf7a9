"""An opt-in step cache in the First-Block Cache style: when the first transformer block changes the
image tokens almost as it did at the last fully computed step, the remaining blocks are skipped and
their last contribution (cached) is reused.

Per step the model runs its first double block and measures the block's residual r = out - in on
the image tokens. With r_full the residual of the last fully computed step, the step is skipped when
mean|r - r_full| / mean|r_full| < threshold: the image tokens become out + (what the remaining
blocks added at that full step), and the final layer runs as usual. The first and the last step are
always computed in full (the composition is set at the start; the detail at the end), and
threshold 0 never skips, which reproduces the uncached image exactly.

This changes the image (a faster approximation), so it is off by default and the number of full
evaluations is reported in the image's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StepCache:
    """The state of one generation's cache; `threshold` 0 = compute every step."""

    threshold: float
    full_evaluations: int = 0
    skipped: int = 0
    force_full: bool = True  # set by the sampler for the first and the last step
    _first_residual: Tensor | None = field(default=None, repr=False)
    _rest_residual: Tensor | None = field(default=None, repr=False)

    def can_skip(self, first_residual: Tensor) -> bool:
        """Whether this step may reuse the cached rest of the model (counts the step either way)."""
        reference = self._first_residual
        if self.force_full or self.threshold <= 0 or reference is None or self._rest_residual is None:
            self.full_evaluations += 1
            return False
        change = (first_residual - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12)
        if float(change) < self.threshold:
            self.skipped += 1
            return True
        self.full_evaluations += 1
        return False

    def rest(self) -> Tensor:
        assert self._rest_residual is not None
        return self._rest_residual

    def store(self, first_residual: Tensor, rest_residual: Tensor) -> None:
        """After a fully computed step: the first block's residual and what the other blocks added."""
        self._first_residual = first_residual
        self._rest_residual = rest_residual

    def report(self) -> dict:
        return {
            "threshold": self.threshold,
            "full_evaluations": self.full_evaluations,
            "skipped": self.skipped,
        }
