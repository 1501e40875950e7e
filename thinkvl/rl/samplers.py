"""Which problems an RL iteration trains on: uniform, prioritized, curriculum, or both (k1.5).

One class, :class:`ProblemSampler`, does all of it; the named classes fix its settings:

- prioritized: draw problem i with probability proportional to ``1 - s_i``, s_i its success rate
  so far (``init_success`` before it is first seen); all weights 0 -> uniform.
- curriculum: problems ordered by difficulty label (pass rate, high = easy; unlabelled = median
  label). At progress ``p = min(1, step / curriculum_steps)`` only the easiest
  ``ceil((start_frac + (1 - start_frac) * p) * n)`` problems are eligible.
- both: priority weights restricted to the curriculum pool.

A batch is drawn without replacement while there are enough eligible problems with positive weight;
beyond that further rounds start (a problem may then appear twice). The proportionality to
``1 - s_i`` holds for each single draw; within one batch, sampling without replacement flattens it a
little, as it must.

Every sampler owns a ``numpy.random.Generator`` (never the global RNG); ``state_dict()`` holds its
state and the success statistics as plain Python values (JSON / ``torch.load(weights_only=True)``
safe), so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SAMPLER_KINDS",
    "ProblemSampler",
    "UniformSampler",
    "PrioritizedSampler",
    "CurriculumSampler",
    "build_sampler",
    "curriculum_order",
    "curriculum_pool_size",
    "priority_weights",
]

SAMPLER_KINDS = ("uniform", "prioritized", "curriculum", "curriculum+prioritized")
_STATE_VERSION = 1


def curriculum_order(difficulties: Sequence[float | None]) -> list[int]:
    """Problem indices from easiest to hardest.

    Sorted by pass rate, descending; an unlabelled problem (None) counts as the median label; ties
    keep index order so the order is deterministic.

    Raises:
        ValueError: if no problem is labelled or a label is outside [0, 1].
    """
    labelled = [d for d in difficulties if d is not None]
    if not labelled:
        raise ValueError("curriculum needs at least one difficulty label (pass rate), got none")
    if any(not (0.0 <= d <= 1.0) for d in labelled):  # also rejects NaN
        raise ValueError("difficulty labels are pass rates and must lie in [0, 1]")
    median = float(np.median(labelled))
    keys = [median if d is None else float(d) for d in difficulties]
    return sorted(range(len(keys)), key=lambda i: (-keys[i], i))


def curriculum_pool_size(n: int, step: int, schedule_steps: int, start_frac: float) -> int:
    """Number of easiest problems eligible at ``step``: ``ceil((f0 + (1 - f0) * p) * n)``.

    ``p = clamp(step / schedule_steps, 0, 1)``; the pool grows linearly from ``start_frac`` of the
    problems to all of them (ours: linear), and always holds at least one problem.
    """
    progress = min(1.0, max(0.0, step / schedule_steps))
    frac = start_frac + (1.0 - start_frac) * progress
    # the small slack stops 0.3 * 10 = 3.0000000000000004 from rounding up to 4
    return max(1, min(n, math.ceil(frac * n - 1e-9)))


def priority_weights(success: np.ndarray) -> np.ndarray:
    """Draw probabilities proportional to ``1 - s_i``; uniform when every weight is 0.

    Args:
        success: ``[m]`` success rates in [0, 1].

    Returns:
        ``[m]`` float64 probabilities summing to 1.
    """
    w = np.clip(1.0 - np.asarray(success, dtype=np.float64), 0.0, 1.0)
    total = w.sum()
    if total <= 0.0:
        return np.full(len(w), 1.0 / len(w))
    return w / total


class ProblemSampler:
    """Seeded problem sampler; uniform, prioritized, curriculum or curriculum + prioritized.

    Args:
        n: number of problems.
        seed: seed of the sampler's own generator.
        difficulties: ``[n]`` pass-rate labels (None = unlabelled); needed for a curriculum.
        curriculum_steps: steps over which the pool grows to all problems; 0 = no curriculum.
        start_frac: share of (easiest) problems eligible at step 0.
        prioritized: weight draws by ``1 - s_i`` instead of uniformly.
        init_success: s_i of a problem not seen yet.
        ema: None -> s_i is the mean of all observed success rates of problem i; a float in [0, 1)
            -> ``s_i <- ema * s_i + (1 - ema) * observed`` (old weight ``ema``). In both modes the
            first observation replaces ``init_success``, which is a prior, not an observation.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        difficulties: Sequence[float | None] | None = None,
        curriculum_steps: int = 0,
        start_frac: float = 0.3,
        prioritized: bool = False,
        init_success: float = 0.0,
        ema: float | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if curriculum_steps < 0:
            raise ValueError(f"curriculum_steps must be >= 0, got {curriculum_steps}")
        if not 0.0 < start_frac <= 1.0:
            raise ValueError(f"start_frac must be in (0, 1], got {start_frac}")
        if not 0.0 <= init_success <= 1.0:
            raise ValueError(f"init_success must be in [0, 1], got {init_success}")
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be None or in [0, 1), got {ema}")
        if difficulties is not None and len(difficulties) != n:
            raise ValueError(f"got {len(difficulties)} difficulties for n={n} problems")
        if curriculum_steps > 0 and difficulties is None:
            raise ValueError("a curriculum (curriculum_steps > 0) needs difficulties")
        self.n = n
        self.curriculum_steps = curriculum_steps
        self.start_frac = start_frac
        self.prioritized = prioritized
        self.init_success = init_success
        self.ema = ema
        self._order = np.asarray(
            curriculum_order(difficulties) if curriculum_steps > 0 else range(n), dtype=np.int64
        )
        self._rng = np.random.default_rng(seed)
        self._success = np.full(n, init_success, dtype=np.float64)  # [n] s_i
        self._counts = np.zeros(n, dtype=np.int64)  # [n] updates seen per problem
        self._last_step = 0

    # -- drawing ---------------------------------------------------------------------------------
    def pool(self, step: int) -> np.ndarray:
        """Indices eligible at ``step`` (easiest first under a curriculum)."""
        if self.curriculum_steps == 0:
            return self._order
        size = curriculum_pool_size(self.n, step, self.curriculum_steps, self.start_frac)
        return self._order[:size]

    def probabilities(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pool, p)``: eligible indices and the probability of each on a single draw."""
        pool = self.pool(step)
        if self.prioritized:
            return pool, priority_weights(self._success[pool])
        return pool, np.full(len(pool), 1.0 / len(pool))

    def sample(self, batch_size: int, step: int) -> list[int]:
        """Draw ``batch_size`` problem indices for training step ``step``."""
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        self._last_step = step
        pool, p = self.probabilities(step)
        drawn: list[int] = []
        while len(drawn) < batch_size:
            # numpy draws without replacement only among positive-probability items
            m = min(batch_size - len(drawn), int(np.count_nonzero(p)))
            drawn.extend(int(i) for i in self._rng.choice(pool, size=m, replace=False, p=p))
        return drawn

    def update(self, indices: Sequence[int], success_rates: Sequence[float]) -> None:
        """Record the success rate (mean verifier reward of its k samples) of each drawn problem.

        Raises:
            ValueError: on mismatched lengths, an index out of range or a rate outside [0, 1]
                (pass the verifier's success, not the total reward with its length part).
        """
        if len(indices) != len(success_rates):
            raise ValueError(f"got {len(indices)} indices but {len(success_rates)} success rates")
        for i, rate in zip(indices, success_rates):
            if not 0 <= i < self.n:
                raise ValueError(f"problem index {i} out of range [0, {self.n})")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"success rate must be in [0, 1], got {rate} for problem {i}")
            c = self._counts[i]
            if c == 0:
                self._success[i] = rate
            elif self.ema is None:
                self._success[i] += (rate - self._success[i]) / (c + 1)
            else:
                self._success[i] = self.ema * self._success[i] + (1.0 - self.ema) * rate
            self._counts[i] = c + 1

    @property
    def success(self) -> np.ndarray:
        """``[n]`` current success estimates s_i (a copy)."""
        return self._success.copy()

    # -- logging ---------------------------------------------------------------------------------
    def summary(self, step: int | None = None) -> dict[str, float]:
        """Scalars for the metrics log, at ``step`` (default: the last step sampled).

        Keys: ``pool_size``, ``pool_frac``, ``seen_frac`` (problems updated at least once),
        ``success_mean`` (over seen problems; 0 if none), ``pool_success_mean`` (s_i over the pool,
        priors included), ``weight_entropy`` (nats, of a single draw over the pool) and
        ``weight_entropy_frac`` (that entropy / log(pool size); 1 = uniform).
        """
        pool, p = self.probabilities(self._last_step if step is None else step)
        seen = self._counts > 0
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        return {
            "pool_size": float(len(pool)),
            "pool_frac": len(pool) / self.n,
            "seen_frac": float(seen.mean()),
            "success_mean": float(self._success[seen].mean()) if seen.any() else 0.0,
            "pool_success_mean": float(self._success[pool].mean()),
            "weight_entropy": entropy,
            "weight_entropy_frac": entropy / math.log(len(pool)) if len(pool) > 1 else 1.0,
        }

    # -- checkpointing ---------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "curriculum_steps": self.curriculum_steps,
            "start_frac": self.start_frac,
            "prioritized": self.prioritized,
            "ema": self.ema,
        }

    def state_dict(self) -> dict[str, Any]:
        """Generator state, success statistics and settings, as plain Python values."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "success": self._success.tolist(),
            "counts": self._counts.tolist(),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next draws continue the saved sequence.

        Raises:
            ValueError: if the state was saved by a sampler with other settings.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        mine = self._config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"sampler state has {key}={value!r} "
                    f"but this sampler has {key}={mine.get(key)!r}"
                )
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._success = np.asarray(state["success"], dtype=np.float64)
        self._counts = np.asarray(state["counts"], dtype=np.int64)
        self._last_step = int(state["last_step"])


class UniformSampler(ProblemSampler):
    """Every problem equally likely."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)


class PrioritizedSampler(ProblemSampler):
    """Draw problem i with probability proportional to ``1 - s_i`` (see :class:`ProblemSampler`)."""

    def __init__(
        self, n: int, seed: int, init_success: float = 0.0, ema: float | None = None
    ) -> None:
        super().__init__(n, seed, prioritized=True, init_success=init_success, ema=ema)


class CurriculumSampler(ProblemSampler):
    """Easy problems first, the pool widening to all over ``schedule_steps`` steps.

    ``prioritized=True`` weights draws inside the pool by ``1 - s_i`` (curriculum + prioritized).
    """

    def __init__(
        self,
        difficulties: Sequence[float | None],
        seed: int,
        schedule_steps: int,
        start_frac: float = 0.3,
        prioritized: bool = False,
        init_success: float = 0.0,
        ema: float | None = None,
    ) -> None:
        if schedule_steps < 1:
            raise ValueError(f"schedule_steps must be >= 1, got {schedule_steps}")
        super().__init__(
            len(difficulties),
            seed,
            difficulties=difficulties,
            curriculum_steps=schedule_steps,
            start_frac=start_frac,
            prioritized=prioritized,
            init_success=init_success,
            ema=ema,
        )


def build_sampler(
    kind: str,
    n: int,
    seed: int,
    difficulties: Sequence[float | None] | None = None,
    *,
    curriculum_steps: int = 0,
    start_frac: float = 0.3,
    init_success: float = 0.0,
    ema: float | None = None,
) -> ProblemSampler:
    """The sampler named ``kind`` (one of :data:`SAMPLER_KINDS`); irrelevant settings are ignored.

    Raises:
        ValueError: naming the allowed kinds if ``kind`` is unknown, or if a curriculum kind lacks
            ``difficulties`` or ``curriculum_steps >= 1``.
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}; allowed: {list(SAMPLER_KINDS)}")
    prioritized = kind.endswith("prioritized")
    if kind.startswith("curriculum"):
        if difficulties is None:
            raise ValueError(f"sampler kind {kind!r} needs difficulties (pass-rate labels)")
        if len(difficulties) != n:
            raise ValueError(f"got {len(difficulties)} difficulties for n={n} problems")
        return CurriculumSampler(
            difficulties, seed, curriculum_steps, start_frac, prioritized, init_success, ema
        )
    return ProblemSampler(n, seed, prioritized=prioritized, init_success=init_success, ema=ema)
