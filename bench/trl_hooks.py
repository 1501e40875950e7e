"""Instrumentation for TRL trainers: per-optimizer-step wall clock and token counts.

Only counting is added (a `training_step` wrapper reading the batch, a callback at step end); the
trainers' own code paths are untouched.
"""

from __future__ import annotations

from transformers import TrainerCallback

from bench.common import StepClock


class ClockCallback(TrainerCallback):
    """Ticks a StepClock at every optimizer-step end; the clock starts at `on_train_begin`, after
    TRL's dataset preparation and model setup (reported apart as setup time)."""

    def __init__(self, counter: "BatchCounter"):
        self.clock: StepClock | None = None
        self.counter = counter

    def on_train_begin(self, args, state, control, **kw):
        self.clock = StepClock()

    def on_step_end(self, args, state, control, **kw):
        self.clock.tick()
        self.counter.close_step()


class BatchCounter:
    """Token counts of the micro-batches of each optimizer step."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.supervised: list[int] = []
        self.slots: list[int] = []
        self._cur = [0, 0, 0]

    def add(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        labels = inputs.get("labels")
        mask = inputs.get("attention_mask")
        if "completion_mask" in inputs and labels is None:  # GRPO: prompt + completion tensors
            return
        self._cur[0] += int(mask.sum()) if mask is not None else ids.numel()
        self._cur[1] += int((labels != -100).sum()) if labels is not None else 0
        self._cur[2] += ids.numel()

    def close_step(self) -> None:
        self.tokens.append(self._cur[0])
        self.supervised.append(self._cur[1])
        self.slots.append(self._cur[2])
        self._cur = [0, 0, 0]


def counting(trainer_cls):
    """A subclass of a TRL trainer whose training_step also feeds a BatchCounter."""

    class Counting(trainer_cls):
        bench_counter: BatchCounter

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.bench_counter.add(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    Counting.__name__ = f"Counting{trainer_cls.__name__}"
    return Counting


def quiet(trainer) -> None:
    """No per-step log printing (PrinterCallback) or progress bars: they cost time and clutter."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def silence_libraries() -> None:
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
