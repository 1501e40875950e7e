"""Checkpoints that survive a crash, load nothing executable, and are sharded.

A checkpoint is a folder `checkpoints/step-N/`:
    model/       the model's state, a torch.distributed.checkpoint (DCP) folder: each rank writes its
                 own shards (`__RANK_0.distcp`) and rank 0 an index (`.metadata`); no rank gathers.
                 With LoRA it holds only the trained parameters (the adapters); the frozen base
                 is the model the run starts from
    optim/       the optimiser's state, the same way; absent while the optimiser has never stepped
                 (trainer.json's `optimizer_state` is false), so that saving does not initialise it
    trainer.json the trainer's state: step, data position, sampler, random generators
    COMPLETE     written last; a folder without it is not a checkpoint

One format for one process and many: DCP reshards on load, so a checkpoint written by N processes
resumes in M. It is written into `.tmp-step-N/`, every file and the folder are fsynced, the folder is
renamed into place (atomic on POSIX) and the parent folder is fsynced, so after a crash or a power
loss a `step-N/` either is whole or does not exist. Under torchrun the checkpoint folder must be on a
file system every rank sees. Loading reads DCP's pickled index with an unpickler that builds only
DCP's own metadata records, and every other value with `torch.load(weights_only=True)` (or JSON): a
checkpoint from someone else can hold only data, never code to run. Checkpoints of thinkvl before
this format (model.pt / optim.pt / trainer.pt) are not read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from thinkvl.config import ConfigError
from thinkvl.train import distributed as D

MARKER = "COMPLETE"
# Test hook: THINKVL_CRASH_AT=STEP:POINT makes the process SIGKILL itself while it saves the step-STEP
# checkpoint, just before POINT (one of CRASH_POINTS); the crash-safety tests use it.
CRASH_ENV = "THINKVL_CRASH_AT"
CRASH_POINTS = ("model", "model.metadata", "optim", "optim.metadata", "trainer", "fsync", "complete", "rename",
                "cleanup")  # X.metadata: X's shards are written, DCP's index of them is not


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and why."""


def crash_point(step: int, point: str) -> None:
    """SIGKILL this process here when THINKVL_CRASH_AT names this step and point (tests only)."""
    if os.environ.get(CRASH_ENV) == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder itself last."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


def begin(ckpt_dir: Path, step: int) -> Path:
    """A fresh temporary folder for the step-`step` checkpoint (a crashed save's leftover removed)."""
    tmp = ckpt_dir / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int) -> Path:
    """fsync `tmp`, mark it complete, rename it to step-`step` and fsync the parent; then delete all but
    the `keep` newest complete checkpoints (and leftovers of crashed saves)."""
    crash_point(step, "fsync")
    fsync_tree(tmp)
    crash_point(step, "complete")
    (tmp / MARKER).write_text(json.dumps({"step": step}))
    fsync(tmp / MARKER)
    fsync(tmp)
    crash_point(step, "rename")
    final = publish(tmp, tmp.parent / f"step-{step}")
    crash_point(step, "cleanup")
    for p in complete(tmp.parent)[:-keep]:
        shutil.rmtree(p)
    for p in tmp.parent.glob(".*-step-*"):
        shutil.rmtree(p)
    return final


def publish(tmp: Path, final: Path) -> Path:
    """Rename the (fsynced) folder `tmp` to `final`, replacing one already there, and fsync the parent."""
    if final.exists():  # the same step saved again by a resumed run, or a second export: move it aside
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync(final.parent)
    return final


def complete(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints under `ckpt_dir`, oldest first."""
    if not ckpt_dir.exists():
        return []
    found = []
    for p in ckpt_dir.glob("step-*"):
        if (p / MARKER).exists() and p.name.split("-")[1].isdigit():
            found.append((int(p.name.split("-")[1]), p))
    return [p for _, p in sorted(found)]


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj))


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def rng_state() -> dict:
    """Python's and torch's random generators as JSON values."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def set_rng_state(s: dict) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


# --- save and load --------------------------------------------------------------------------------
def save(ckpt_dir: Path, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, trainer: dict,
         keep: int, d: D.Dist, trainable_only: bool = False) -> None:
    """Write checkpoints/step-`step` (see the module docstring); every rank calls this.

    An optimiser that has not stepped yet (RL skips an iteration without signal) has no state, and
    none is written (no optim/ folder; trainer.json says so): torch's `get_state_dict` would first
    run an initialising step with zero gradients and lr 0 on it, which sets AdamW's step counts to 1
    (a smaller first real step through the bias correction) and leaves the state non-empty.
    `trainable_only` (LoRA): the model's state holds only the parameters that train (the adapters);
    the frozen base weights and buffers are the ones the run loads at start."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    stepped = stepped_anywhere(optim, d)
    if stepped:
        model_sd, optim_sd = get_state_dict(model, optim, options=options)  # this rank's shards (DTensors)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    model_sd = _only_trained(model, model_sd) if trainable_only else model_sd
    tmp = ckpt_dir / f".tmp-step-{step}"
    if d.main:
        begin(ckpt_dir, step)
    D.barrier(d)
    for name, sd in (("model", model_sd), ("optim", optim_sd)):
        if sd is None:
            continue
        crash_point(step, name)
        with _one_process_is_intended():
            dcp.save(sd, storage_writer=_Writer(tmp / name, step, name), no_dist=not d.enabled)
    if d.main:
        crash_point(step, "trainer")
        save_json(dict(trainer, step=step, rng=rng_state(), optimizer_state=stepped), tmp / "trainer.json")
        commit(tmp, step, keep)
    D.barrier(d)


def _only_trained(model: torch.nn.Module, model_sd: dict) -> dict:
    """The entries of the trained parameters (torch's ignore_frozen_params keeps buffers, and a frozen
    weight tied to another, such as an LM head tied to the embedding)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trained}


def stepped_anywhere(optim: torch.optim.Optimizer, d: D.Dist) -> bool:
    """Whether the optimiser holds state (has stepped) on any rank."""
    return D.all_reduce_sum(float(bool(optim.state)), d) > 0


def load(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer, d: D.Dist,
         trainable_only: bool = False) -> dict:
    """Restore model and optimiser from checkpoint `path` into this run's (sharded) model at any
    number of processes; returns the trainer state and restores the random generators.

    The optimiser keeps this run's hyperparameters (lr, betas, momentum, weight decay, fused/foreach):
    a resumed run with a new `loss.momentum` would otherwise silently keep the old one. A checkpoint
    saved before the optimiser's first step leaves this (fresh) optimiser as it is; a parameter
    without saved state (no gradient yet) keeps none, as in the run that saved it. Raises
    ConfigError when the checkpoint was written by another optimiser (`loss.optimizer`), for another
    set of trained parameters (`model.trainable`, `model.freeze_*`) or weights (`model.lora`)."""
    state = load_json(path / "trainer.json")
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    has_optim = state.get("optimizer_state", True)
    if has_optim:
        model_sd, optim_sd = get_state_dict(model, optim, options=options)  # the layout to read into
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    model_sd = _only_trained(model, model_sd) if trainable_only else model_sd
    _check_model(path / "model", model_sd, trainable_only)  # first: the clearer error of the two
    if has_optim:
        saved = _check_optimizer(path / "optim", optim, optim_sd)
        mine = [{k: v for k, v in g.items() if k != "params"} for g in optim.param_groups]
    for name, sd in (("model", model_sd), ("optim", optim_sd)):
        if sd is None:
            continue
        reader = _SafeReader(path / name)
        reader.read_metadata()  # a refused index raises here, before DCP rewraps the error
        try:
            with _one_process_is_intended():
                dcp.load(sd, storage_reader=reader, planner=_SafePlanner(reader, partial=name == "optim"),
                         no_dist=not d.enabled)
        except CheckpointException as e:  # DCP wraps each rank's error; ours name the file
            for exc, _ in e.failures.values():
                if isinstance(exc, CheckpointError):
                    raise exc from None
            raise
    if has_optim:
        set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
        # get_state_dict gave every trained parameter initialised state (step 1, zero moments); a
        # parameter the checkpoint has none for had none in the saved run: drop it, so its first
        # step is a first step here too.
        unsaved = {name for name in optim_sd["state"] if name not in saved}
        for name, p in model.named_parameters():
            if name in unsaved:
                optim.state.pop(p, None)
        for g, keep in zip(optim.param_groups, mine):
            g.update(keep)
    else:
        set_model_state_dict(model, model_sd, options=options)
    set_rng_state(state["rng"])
    return state


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns on every save and load without a process group; one process is a normal run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_optimizer(folder: Path, optim: torch.optim.Optimizer, optim_sd: dict) -> set[str]:
    """ConfigError when the saved optimiser state is another optimiser's or other parameters'; else
    the names of the parameters that have saved state."""
    entries = _SafeReader(folder).read_metadata().state_dict_metadata
    keys = list(entries)
    saved = {k[len("state."):].rsplit(".", 1)[0] for k in keys if k.startswith("state.")}
    kind = lambda sgd: "sgd" if sgd else "adamw"  # noqa: E731
    theirs = kind(any(k.endswith(".momentum_buffer") for k in keys))
    ours = kind(any("momentum" in g for g in optim.param_groups))
    if theirs != ours:
        raise ConfigError(f"loss.optimizer: the checkpoint's optimiser state is {theirs}'s, this run's optimiser "
                          f"is {ours}; resume with the same optimiser or use a new out_dir")
    ours_shapes = {f"state.{fqn}.{k}": tuple(v.shape) for fqn, st in optim_sd["state"].items()
                   for k, v in st.items() if torch.is_tensor(v)}
    theirs_shapes = {k: tuple(v.size) for k, v in entries.items() if k.startswith("state.") and hasattr(v, "size")}
    # A parameter that never had a gradient (a vision tower in text-only RL) has no saved state, and
    # keeps the fresh state get_state_dict gave it; state for a parameter this run does not train is
    # another run's.
    if not saved <= set(optim_sd["state"]) or any(ours_shapes.get(k, s) != s for k, s in theirs_shapes.items()):
        raise ConfigError("model.trainable / model.freeze_*: the checkpoint's optimiser state is for other "
                          "trained parameters than this run's; resume with the same settings or use a new out_dir")
    return saved


def _check_model(folder: Path, model_sd: dict, trainable_only: bool) -> None:
    """ConfigError when the checkpoint lacks weights this run loads: a full model's checkpoint
    resumed with LoRA, or a LoRA run's (adapters only) resumed without."""
    theirs = set(_SafeReader(folder).read_metadata().state_dict_metadata)
    missing = sorted(set(model_sd) - theirs)
    if missing:
        raise ConfigError(f"model.lora: the checkpoint lacks weights this run loads (e.g. {missing[0]}): it was "
                          f"written {'without' if trainable_only else 'with'} LoRA adapters, or for another model; "
                          "resume with the settings it was written with, or use a new out_dir")


class _Writer(FileSystemWriter):
    """DCP's file writer (fsyncs each file it writes) with the crash-test point before its index."""

    def __init__(self, path: Path, step: int, name: str):
        super().__init__(path, sync_files=True)
        self._point = (step, f"{name}.metadata")

    def finish(self, metadata, results) -> None:
        crash_point(*self._point)
        super().finish(metadata, results)


# DCP's index (`.metadata`) is a pickle of these records; nothing else may be built from it.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # maps a layout's name to the layout
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """DCP's file reader, reading its pickled index with `_MetadataUnpickler`; tensor data it already
    reads with `torch.load(weights_only=True)`."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {self.path} is not a complete checkpoint folder")
        with path.open("rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise _refused(path, e) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except pickle.UnpicklingError as e:
            raise _refused(Path(self.path), e) from None


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, loading non-tensor values (step counts, hyperparameters, names) with
    `torch.load(weights_only=True)` where DCP's own uses weights_only=False."""

    def __init__(self, reader: _SafeReader, partial: bool = False):
        super().__init__(allow_partial_load=partial)
        self._reader = reader

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            info = self._reader.storage_data[read_item.storage_index]
            raise _refused(Path(self._reader.path) / info.relative_path, e) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _SafeWholePlanner(_SafePlanner, _EmptyStateDictLoadPlanner):
    """`_SafePlanner` that builds the whole state dict from the index (`read`)."""


def read(folder: Path) -> dict:
    """The whole state in one DCP folder of a checkpoint (`step-N/model` or `step-N/optim`), however
    many processes wrote it, as plain tensors and values in this process (to inspect a checkpoint,
    and for tests); read as safely as `load` reads."""
    reader = _SafeReader(folder)
    reader.read_metadata()
    state: dict = {}
    # dcp.load fills only the keys it is given; its inner function lets the planner build them all
    _load_state_dict(state, storage_reader=reader, planner=_SafeWholePlanner(reader), no_dist=True)
    return state


def _refused(path: Path, e: Exception) -> CheckpointError:
    # torch's message wraps the reason (e.g. "unsupported GLOBAL posix.system") in advice to retry with
    # weights_only=False, which is the one thing not to do here: keep only the reason.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[-1] if lines else type(e).__name__)
    return CheckpointError(f"{path}: refused to load: it holds Python objects that would run code when unpickled "
                           f"({why}); thinkvl checkpoints hold only tensors, numbers, strings, lists and dicts, so "
                           "this file was not written by thinkvl")
