"""Checkpoints: a `Checkpointer` owns when a checkpoint is written (every
train.checkpoint.every_steps, at a wsd run's decay start, or when the loop must stop), where
(checkpoints/step-N), what goes in it (model and tokenizer, optimizer, scheduler, each process's
RNG, the RunState and the data position in trainer_state.json, the manifest) and how a run
resumes from one. Every write is atomic (runs/atomic.py): to `.tmp-step-N`, fsynced, renamed.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from cpt_cli.config import Recipe, model_location, to_plain
from cpt_cli.config.resume import changes as recipe_changes
from cpt_cli.config.resume import refusal
from cpt_cli.data.prepare import PreparedData
from cpt_cli.data.replan import mix_of, plan_history, revise
from cpt_cli.data.replay_control import ControllerState
from cpt_cli.errors import UsageError
from cpt_cli.runs.atomic import fsync_tree, publish, rotate
from cpt_cli.runs.layout import CHECKPOINTS
from cpt_cli.runs.lineage import FORMAT, MANIFEST, copy_heldout, environment, write_json
from cpt_cli.training.collective import write_together
from cpt_cli.training.deepspeed import (
    deepspeed_optimizer_state,
    is_deepspeed,
    load_deepspeed_state,
    save_deepspeed_state,
)
from cpt_cli.training.optim import (
    apply_hyperparameters,
    load_state,
    optimizer_state,
    restore_optimizer,
)
from cpt_cli.training.schedule import decay_start


@dataclass
class RunState:
    """What a checkpoint stores besides weights and optimizer: enough to continue exactly."""

    step: int = 0
    bad_steps: int = 0
    peak_forgetting: float | None = None
    # Closed-loop replay's controller after its last decision (None: not an auto run, or no
    # decision yet): a resumed run continues from it, so it decides as the straight run did.
    replay_control: ControllerState | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """When, where and what is saved, and the restore. The loop only says that a step ended
    (`save`) and whether it must stop (`force`); the interval, the kept-forever checkpoint and
    the rotation (train.checkpoint.keep) are decided here."""

    def __init__(self, run_dir: Path, recipe: Recipe, steps: int, accelerator: Any, model: Any,
                 optimizer: Any, scheduler: Any, data: PreparedData) -> None:
        self.run_dir, self.root = run_dir, run_dir / CHECKPOINTS
        self.recipe, self.steps, self.data = recipe, steps, data
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.every = recipe.train.checkpoint.every_steps
        # A wsd run's checkpoint at the start of its decay is kept forever: a later stage can
        # branch from the stable phase (docs/choosing-replay-and-schedules.md).
        self.keep_forever_step = decay_start(recipe.train.schedule, steps) \
            if recipe.train.schedule.name == "wsd" else None

    def save(self, state: RunState, *, force: bool = False) -> Path | None:
        """checkpoints/step-N if one is due after `state.step` (or `force`d: a stop), else None.
        The last step writes none: final/ follows it."""
        due = (self.every and state.step % self.every == 0) or force or \
            state.step == self.keep_forever_step
        if not due or state.step == self.steps:
            return None
        return self._write(state, keep_forever=state.step == self.keep_forever_step)

    def _write(self, state: RunState, keep_forever: bool) -> Path:
        """Write checkpoints/step-N atomically: everything goes to `.tmp-step-N`, is flushed to
        disk, and only then renamed; a write that fails anywhere removes the temporary folder
        and leaves every earlier checkpoint as it was."""
        name = f"step-{state.step:06d}"
        tmp, target = self.root / f".tmp-{name}", self.root / name
        accelerator, data = self.accelerator, self.data
        main = accelerator.is_main_process
        unwrapped, state_dict, optim_state = self._gather()

        def prepare() -> None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write() -> None:
            if main:
                write_model_folder(tmp, self.run_dir, unwrapped, state_dict, optim_state,
                                   manifest(self.recipe, data, state.step, accelerator), data)
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")

        def publish_folder() -> None:
            if main:
                # trainer_state.json last: complete_checkpoints() only counts folders that have it.
                write_json(tmp / "trainer_state.json", {
                    "step": state.step, "bad_steps": state.bad_steps,
                    "peak_forgetting": state.peak_forgetting, "data": {
                        "plan": data.plan.fingerprint(), "sequences_consumed":
                        state.step * data.global_batch,
                        "sources": {s.name: s.content for s in data.plan.sources}},
                    "num_processes": accelerator.num_processes, "keep": keep_forever,
                    # What a resume compares the recipe with, and the plan it rebuilds.
                    "recipe": to_plain(self.recipe), "plan_history": data.plan_history,
                    "revisions": data.revisions,
                    "replay_control": state.replay_control.as_dict()
                    if state.replay_control is not None else None})
                fsync_tree(tmp)
                publish(tmp, target)
                rotate(self.root, self.recipe.train.checkpoint.keep)

        def write_deepspeed() -> None:
            # Its own phase, on every process, after `prepare` made the folder: the engine's save
            # waits for all processes inside, so none may have left early from a failed write.
            if is_deepspeed(accelerator):
                save_deepspeed_state(tmp, self.model)

        for phase in (prepare, write_deepspeed, write, publish_folder):
            write_together(accelerator, f"checkpoint {name}", target, phase, cleanup=tmp)
        return target

    def save_final(self, state: RunState) -> Path:
        """final/: a Hugging Face model folder plus the manifest, the held-out texts and the
        optimizer state (for a next stage's `optimizer.load_from_parent`; AdamW keeps two fp32
        moments per parameter, so optimizer.pt is about twice the fp32 weights)."""
        run_dir, data, accelerator = self.run_dir, self.data, self.accelerator
        final = run_dir / "final"
        tmp = run_dir / ".tmp-final"
        main = accelerator.is_main_process
        unwrapped, state_dict, optim_state = self._gather()

        def write() -> None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                written = manifest(self.recipe, data, state.step, accelerator)
                write_model_folder(tmp, run_dir, unwrapped, state_dict, optim_state, written,
                                   data)
                fsync_tree(tmp)
                publish(tmp, final)
                write_json(run_dir / MANIFEST, written)

        write_together(accelerator, "the final model", final, write, cleanup=tmp)
        return final

    def _gather(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """The unwrapped model, its full state dict and the full optimizer state, for a
        checkpoint or final/. Called on every process: under FSDP or DeepSpeed the gathering is
        collective."""
        accelerator, model = self.accelerator, self.model
        unwrapped, state_dict = accelerator.unwrap_model(model), accelerator.get_state_dict(model)
        optim_state = deepspeed_optimizer_state(model, self.optimizer, self.recipe) \
            if is_deepspeed(accelerator) else optimizer_state(model, self.optimizer)
        return unwrapped, state_dict, optim_state

    def restore(self, path: Path) -> RunState:
        """Weights, optimizer, scheduler and this process's RNG from checkpoint `path`."""
        accelerator = self.accelerator
        meta = read_trainer_state(path)  # checked against the recipe when the data was planned
        if is_deepspeed(accelerator):
            load_deepspeed_state(path, self.model)
        else:
            _load_weights_and_optimizer(path, accelerator, self.model, self.optimizer)
        self.scheduler.load_state_dict(load_state(path / "scheduler.pt"))
        applied = [c["key"] for r in self.data.revisions if r["step"] == meta["step"]
                   for c in r["changes"]]
        if any(k.startswith(("train.optimizer.", "train.schedule.")) for k in applied):
            apply_hyperparameters(self.optimizer, self.scheduler,
                                  accelerator.unwrap_model(self.model), self.recipe)
        rng = path / f"rng-{accelerator.process_index}.pt"
        if rng.exists():
            set_rng_state(load_state(rng))
        control = meta.get("replay_control")
        return RunState(step=meta["step"], bad_steps=meta["bad_steps"],
                        peak_forgetting=meta["peak_forgetting"],
                        replay_control=ControllerState.from_dict(control) if control else None)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(
        np.frombuffer(json.dumps(np.random.get_state(legacy=False), default=_np_default).encode(),
                      dtype=np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()),
                                    dtype=torch.uint8)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    raise TypeError(type(obj))


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = json.loads(bytes(state["numpy"].numpy()).decode())
    np_state["state"] = {k: (np.uint64(v) if not isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_model_folder(folder: Path, run_dir: Path, unwrapped: Any, state_dict: Any,
                       optim_state: dict[str, Any], manifest: dict[str, Any],
                       data: PreparedData) -> None:
    """What a checkpoint and final/ share: the Hugging Face model and tokenizer, the optimizer
    state, the manifest and the held-out texts. With those a folder is a valid model.path whose
    lineage a next stage can replay and evaluate (a wsd run's pre-decay checkpoint, say)."""
    unwrapped.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
    data.tokenizer.save_pretrained(str(folder))
    torch.save(optim_state, folder / "optimizer.pt")
    write_json(folder / MANIFEST, manifest)
    copy_heldout(run_dir, folder)


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot resume from {path}: its trainer_state.json cannot be read "
                         f"({err}); resume from another checkpoint (--resume "
                         "checkpoints/step-N)") from None


def plan_resumed(path: Path, recipe: Recipe, data: PreparedData, num_processes: int, *,
                 replan: bool = False) -> PreparedData:
    """The plan of a run resumed from checkpoint `path`, once it is known to continue this very
    run. Every recipe key that changed is judged by its rule (config/resume.py): refused ones
    are named with both values; a changed mixture is applied from the checkpoint's step with
    `replan` (a plan revision); applied changes are recorded in `data.revisions`. The plan is
    rebuilt from the checkpoint's own history, so sequence i of the steps already trained is the
    same text, and the same number of processes is required (each one's RNG state is saved)."""
    meta = read_trainer_state(path)
    if meta["num_processes"] != num_processes:
        raise UsageError(f"cannot resume from {path}: it was written by "
                         f"{meta['num_processes']} processes, this run has {num_processes}. "
                         "Resume with the same --num-processes.")
    # Checkpoints from before the recipe was saved in them are checked by the plan alone.
    changed = recipe_changes(meta["recipe"], to_plain(recipe)) if "recipe" in meta else []
    message = refusal(changed, str(path), replan=replan, step=meta["step"])
    if message:
        raise UsageError(message)
    history = meta.get("plan_history") or [{"step": 0, "mix": mix_of(recipe)}]
    data = plan_history(recipe, data, num_processes, history)
    assert data.plan is not None
    if meta["data"]["plan"] != data.plan.fingerprint():
        raise UsageError(_plan_changed(path, meta, data))
    mixture = [c for c in changed if c.action == "replan"]
    if mixture:
        data = revise(recipe, data, meta["step"], mix_of(recipe))
    data.revisions = list(meta.get("revisions", []))
    applied = [c.as_dict() for c in changed if c.action in ("apply", "replan")]
    if applied:
        revision: dict[str, Any] = {"step": meta["step"], "changes": applied}
        if mixture:
            revision["plan"] = {k: data.plan.revisions[-1][k] for k in ("old", "new")}
        data.revisions.append(revision)
    return data


def _plan_changed(path: Path, meta: dict[str, Any], data: PreparedData) -> str:
    """The recipe's keys are those of the checkpoint, yet the plan differs: the data did."""
    assert data.plan is not None
    saved = meta["data"].get("sources", {})
    now = {s.name: s.content for s in data.plan.sources}
    moved = [n for n in now if n in saved and saved[n] != now[n]]
    what = (f"the documents of {', '.join(repr(n) for n in moved)} changed since (their files, "
            "or what the cache or the holdout took from them)") if moved else \
        "the data plan changed since (sources, weights, seq_len, budget or batch)"
    return (f"cannot resume from {path}: {what}. Restore the data, or start a new stage with "
            "model.path pointing at the checkpoint.")


def check_checkpoint_weights(path: Path, model: Any) -> None:
    """The checkpoint's weight files are readable and hold this model's shapes: a damaged file,
    or a recipe whose model section changed since, is a message, not a failure halfway through
    loading."""
    from safetensors import safe_open

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"checkpoint {path} has no model.safetensors; resume from another "
                         "checkpoint (--resume checkpoints/step-N)")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    saved = tuple(fh.get_slice(name).get_shape())
                    if name in shapes and shapes[name] != saved:
                        raise UsageError(
                            f"checkpoint {path} holds {name} of shape {list(saved)}, the "
                            f"recipe's model {list(shapes[name])}: the model section changed "
                            "since it was written. Restore it, or start a new run.")
        except SafetensorError as err:
            raise UsageError(f"checkpoint {path}: {shard.name} is damaged ({err}); resume "
                             "from another checkpoint (--resume checkpoints/step-N)") from None


def _load_weights_and_optimizer(path: Path, accelerator: Any, model: Any,
                                optimizer: Any) -> None:
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
    # Tied weights (lm_head = embed_tokens) are saved once; anything else missing is an error.
    tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UsageError(f"checkpoint {path} does not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    restore_optimizer(model, optimizer, load_state(path / "optimizer.pt"))


def start_name(recipe: Recipe) -> str:
    """The start model as the manifest records it: a local folder by its absolute path (`cpt eval`
    loads it from anywhere), a Hub id as given."""
    return model_location(recipe) or "init (from scratch)"


def manifest(recipe: Recipe, data: PreparedData, step: int, accelerator: Any) -> dict[str, Any]:
    """manifest.json after `step` steps: the parent's stages and sources, plus this stage's."""
    assert data.plan is not None
    parent = data.lineage.manifest if data.lineage is not None else None
    stages = list(parent["stages"]) if parent else []
    sources = dict(parent["sources"]) if parent else {}
    consumed = step * data.global_batch
    # Sequences each source served so far, without building a scheduled plan's later segments.
    counts = data.plan.read_positions(consumed) if consumed < data.plan.total_sequences else \
        np.asarray([s.sequences for s in data.plan.sources], dtype=np.int64)
    stage_sources = []
    for k, d in enumerate(data.domains):
        info = {"name": d.name, "role": d.role, "inherited": d.inherited,
                "weight": d.config.weight,
                "content_fingerprint": d.entry.meta["content_fingerprint"] if d.entry else None,
                "documents": len(d.train_docs),
                "sequences_trained": int(counts[k]),
                "tokens_trained": int(counts[k]) * recipe.data.seq_len,
                "heldout": d.heldout_summary()}
        stage_sources.append(info)
        if not d.inherited:
            entry = {"config": to_plain(d.config), "base_dir": str(Path(d.base_dir).resolve()),
                     "heldout": d.heldout_summary(), "stage": len(stages)}
            previous = sources.get(d.name)
            if previous is not None:
                # Redefined under the same name: the earlier definition was trained on, and
                # later held-out sets must still be checked against it.
                earlier = list(previous.get("earlier", []))
                if (previous["config"], previous["base_dir"]) != (entry["config"],
                                                                  entry["base_dir"]):
                    earlier.append({k: previous[k] for k in ("config", "base_dir", "stage")})
                if earlier:
                    entry["earlier"] = earlier
            sources[d.name] = entry
    stages.append({"name": recipe.name, "start_model": start_name(recipe),
                   "steps": step, "tokens": consumed * recipe.data.seq_len,
                   "seq_len": recipe.data.seq_len, "replay_ratio": recipe.data.replay.ratio,
                   "schedule": {"name": recipe.train.schedule.name,
                                "lr": recipe.train.optimizer.lr},
                   "sources": stage_sources,
                   "environment": environment(accelerator.num_processes,
                                              accelerator.device.type),
                   # Only under data.replay.ratio: auto: the budget and every decision so far.
                   **({"replay_control": replay_record(recipe, data)}
                      if recipe.data.replay.is_auto else {}),
                   # Only when a resume changed the recipe: what changed, from which step.
                   **({"revisions": data.revisions} if data.revisions else {}),
                   **({"plan_revisions": data.plan.revisions} if data.plan.revisions else {})})
    return {"format": FORMAT, "name": recipe.name, "stages": stages, "sources": sources,
            "tokenizer_fingerprint": data.tokenizer_fp}


def replay_record(recipe: Recipe, data: PreparedData) -> dict[str, Any]:
    """The manifest's account of closed-loop replay: its settings and each decision (the
    `replay` events of metrics.jsonl, as the plan applied them)."""
    replay = recipe.data.replay
    return {"budget_bpb": replay.max_forgetting_bpb, "min": replay.min, "max": replay.max,
            "start": replay.start,
            "decisions": [h["decision"] for h in data.plan_history if "decision" in h]}
