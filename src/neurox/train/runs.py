"""A trained run read back, and the inference every command shares: the outputs of every window
of a store's participants (gathered from every process), subject-level metrics per split, and
``neurox evaluate`` and ``neurox predict``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from neurox.config import SwiFTConfig
from neurox.data.confounds import participant_motion
from neurox.data.loader import (
    Cohort,
    Target,
    ThreadedLoader,
    WindowDataset,
    as_model_input,
    evaluation_items,
    load_splits,
    prepared_runs,
)
from neurox.data.store import UNNAMED_TEMPLATE, Store, write_tsv
from neurox.data.temporal import TR_TOLERANCE
from neurox.train import distributed as dist_utils
from neurox.train.engine import PRECISIONS, sharded_indices
from neurox.train.objectives import in_units, subject_metrics


def check_fits_store(arch: SwiFTConfig, store: Store) -> None:
    """Refuse, in one line naming the store, a model whose grid or channels the store does not hold."""
    grid = tuple(store.info["grid"])
    if tuple(arch.img_size[:3]) != grid:
        raise ValueError(f"the model takes a {arch.img_size[:3]} grid but the store {store.root} holds {grid}; "
                         "prepare the data with --like MODEL_DIR (or --voxel_size), or choose a matching preset")
    if arch.in_chans != store.info.get("channels", 1):
        raise ValueError(f"the model takes {arch.in_chans} channels, the store has {store.info.get('channels', 1)}")


def check_model_store(model, store: Store, announce: bool = True) -> None:
    """``check_fits_store`` and ``check_contract`` of a model from ``load_pretrained`` and the store it is to read."""
    check_fits_store(model.config, store)
    check_contract(model.input_contract, store, model.model_dir, announce)


def check_contract(contract, store: Store, model_dir: str | Path, announce: bool = True) -> None:
    """Refuse, in one line naming both, a store prepared otherwise than a model's input contract says
    (normalisation, denoising, voxel size): the model would read numbers of a kind it never saw, and its
    outputs would be wrong without any error. A TR more than 10% off is a warning (printed when ``announce``):
    the model's windows then span another length of time. Parts of a contract not recorded (``None``, as in
    a converted checkpoint's space) are not checked."""
    contract = contract.to_dict() if hasattr(contract, "to_dict") else (contract or {})
    store_values = {"normalization": store.info.get("normalization"), "denoising": store.info.get("denoising", "none"),
                    "voxel_size_mm": store.info.get("voxel_size_mm")}
    for key, what in (("normalization", "normalisation"), ("denoising", "denoising"), ("voxel_size_mm", "voxel size")):
        wanted, found = contract.get(key), store_values[key]
        if wanted is None or found is None:
            continue
        if (float(wanted) != float(found)) if key == "voxel_size_mm" else (wanted != found):
            raise ValueError(f"the model {model_dir} expects input of {what} {wanted}, but the store {store.root} has "
                             f"{found}; prepare the data for it with neurox prepare ... --like {model_dir}")
    tr, found_tr = contract.get("tr"), store_tr(store)
    if announce and tr and found_tr and abs(found_tr / tr - 1) > TR_TOLERANCE:
        frames = contract.get("window_frames", 20)
        print(f"warning: the model {model_dir} was trained on runs of TR {tr:g} s and the store {store.root} has TR "
              f"{found_tr:g} s: its {frames}-frame windows span {frames * found_tr:.0f} s here, not "
              f"{frames * tr:.0f} s (neurox prepare ... --resample_tr {tr:g} gives the store the model's TR)",
              file=sys.stderr)
    template, found_template = contract.get("space"), store_template(store.info)
    if announce and template and found_template and template != found_template:
        print(f"warning: the model {model_dir} was trained on runs in {template} and the store {store.root} holds "
              f"runs in {found_template}: the templates place the brain millimetres apart (where fMRIPrep wrote both, "
              f"neurox prepare ... --like {model_dir} takes the model's)", file=sys.stderr)
    desc, found_desc = contract.get("bold_desc"), store.info.get("bold_desc", "preproc")
    if announce and desc and desc != found_desc:
        print(f"warning: the model {model_dir} was trained on desc-{desc} runs and the store {store.root} holds "
              f"desc-{found_desc} runs, another pipeline's output (neurox prepare ... --like {model_dir} reads the "
              "model's)", file=sys.stderr)


@torch.no_grad()
def window_outputs(model, store_root: Path, cohort: Cohort, participants: list[str], length: int, grid,
                   env: dist_utils.Env, batch_size: int, precision: str = "fp32", workers: int = 2,
                   progress: str | None = None):
    """Outputs of every non-overlapping window of the participants' runs, gathered from every
    process and computed once; returns (participant per window, outputs (windows, k)). ``progress``, when
    given, names a progress display of the first process's windows (validation within training shows none)."""
    from neurox.progress import progress as progress_display

    items = evaluation_items(cohort, participants, length)
    if not items:
        return [], np.zeros((0, 1))
    dataset = WindowDataset(store_root, cohort, items, length, grid)
    mine = sharded_indices(len(items), env.world_size, env.rank)
    loader = ThreadedLoader(dataset, mine, batch_size, workers)
    autocast = torch.autocast(env.device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    model.eval()
    indices, outputs = [], []
    bar = progress_display(total=len(mine), desc=progress or "", unit="window",
                           disable=progress is None or not env.is_main)
    failure = None
    batches = iter(loader)
    try:
        while True:
            try:
                x, _, index = next(batches)
            except StopIteration:
                x = None
            except (OSError, ValueError, KeyError) as err:  # every process must still reach the gather
                failure, x = err, None
            # the shares are of equal length, so the processes run out together; one that cannot read its batch
            # stops them all at that batch, since a sharded model's forward is a collective the others would wait in
            if dist_utils.all_reduce_flag(x is None):
                break
            with autocast:
                out = model(as_model_input(x, env.device)).float().cpu()
            indices += index.tolist()
            outputs.append(out.numpy())
            bar.update(len(index))
    finally:
        batches.close()
    bar.close()
    gathered = dist_utils.all_gather_objects((indices, np.concatenate(outputs) if outputs else None,
                                              None if failure is None else str(failure)))
    if failure is not None:
        raise failure
    elsewhere = [g[2] for g in gathered if g[2] is not None]
    if elsewhere:  # another process could not read its share: every process raises, and they stay in step
        raise ValueError(elsewhere[0])
    order, rows = first_rows([i for g in gathered for i in g[0]])
    return [dataset.participant(i) for i in order], np.concatenate([g[1] for g in gathered if g[0]])[rows]


def first_rows(indices: list[int]) -> tuple[list[int], list[int]]:
    """The items of the processes' gathered shares in order, and each one's first row: the padding
    that evens out the shares repeats items, which count once."""
    first: dict[int, int] = {}
    for row, i in enumerate(indices):
        first.setdefault(i, row)
    order = sorted(first)
    return order, [first[i] for i in order]


PARTICIPANTS_AT_ONCE = 16  # per pass of the loader: batches run on across participants, and a stop redoes few


def participant_outputs(model, store: Store, cohort: Cohort, participants: list[str], env: dist_utils.Env,
                        batch_size: int, cache: Path | None, command: str, progress: bool = True
                        ) -> tuple[list[str], np.ndarray]:
    """``window_outputs`` of the participants (participant per window, outputs), for ``predict`` and ``evaluate``
    of a whole cohort, ``PARTICIPANTS_AT_ONCE`` at a time: with ``cache`` (a ``kept_parts`` folder) each
    participant's outputs are kept there, and read from there when present, so that an interrupted run resumes; a
    participant whose frames cannot be read is said in one line and left out, and the others go on."""
    from neurox.io.npz import save_npy
    from neurox.progress import progress as progress_display

    length, grid = model.config.img_size[3], model.config.img_size[:3]
    bar = progress_display(total=len(evaluation_items(cohort, participants, length)), desc=command, unit="window",
                           disable=not progress or not env.is_main)
    made: dict[str, np.ndarray] = {}

    def outputs_of(group: list[str]) -> dict[str, np.ndarray]:
        who, outputs = window_outputs(model, store.root, cohort, group, length, grid, env, batch_size)
        who = np.array(who)
        return {pid: outputs[who == pid] for pid in group if (who == pid).any()}

    # the first process says which are kept, so that every process runs the same groups in step
    kept = dist_utils.broadcast_object([pid for pid in participants if cache is not None and
                                        (cache / f"{pid}.npy").is_file()] if env.is_main else None)
    for pid in kept:
        made[pid] = np.load(cache / f"{pid}.npy")
        bar.update(len(made[pid]))
    todo = [pid for pid in participants if pid not in made]
    for lo in range(0, len(todo), PARTICIPANTS_AT_ONCE):
        group = todo[lo : lo + PARTICIPANTS_AT_ONCE]
        try:
            new = outputs_of(group)
        except (OSError, ValueError, KeyError):  # one of them cannot be read: which, one at a time
            new = {}
            for pid in group:
                try:
                    new.update(outputs_of([pid]))
                except (OSError, ValueError, KeyError) as err:
                    if env.is_main:
                        bar.write(f"neurox {command.split()[0]}: {pid}: {err}; left out")
        for pid, mine in new.items():
            if cache is not None and env.is_main:
                save_npy(cache / f"{pid}.npy", mine)
            bar.update(len(mine))
        made.update(new)
    bar.close()
    if not made:
        raise ValueError(f"{store.root}: no window of {len(participants)} participants could be read")
    return [pid for pid, mine in made.items() for _ in range(len(mine))], np.concatenate(list(made.values()))


def split_metrics(model, store_root, cohort, targets, split, length, grid, env, batch_size: int,
                  precision: str = "fp32", n_boot: int = 1000, motion: dict[str, float] | None = None,
                  progress: str | None = None) -> tuple[dict, list, np.ndarray]:
    """Subject-level metrics of one split (with the motion check when ``motion`` is given), and each
    participant's mean output."""
    participants = cohort.in_split(split)
    who, outputs = window_outputs(model, store_root, cohort, participants, length, grid, env, batch_size, precision,
                                  progress=progress)
    labels = {p: cohort.labels(p) for p in participants}
    return subject_metrics(targets, who, outputs, labels, n_boot, motion=motion)


def load_run(run_dir: str | Path) -> tuple[dict, list[Target], dict[str, str]]:
    run_dir = Path(run_dir)
    if not (run_dir / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished neurox run (no model/); train it with neurox finetune")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config, read_targets(run_dir), load_splits(run_dir / "splits.tsv")


def read_targets(run_dir: str | Path) -> list[Target]:
    """A run's ``targets.json``: the targets as the run encoded them."""
    return [Target(**t) for t in json.loads((Path(run_dir) / "targets.json").read_text())["targets"]]


def run_targets(run_dir: str | Path) -> list[Target]:
    """The targets of a run, or of a cross-validated run's ensemble (``neurox.train.folds``)."""
    from neurox.train.folds import ensemble_targets, fold_models, is_cross_validated

    return ensemble_targets(fold_models(Path(run_dir))) if is_cross_validated(run_dir) else load_run(run_dir)[1]


def evaluate(run_dir: str | Path, store_path: str | Path, batch_size: int = 4, n_boot: int = 1000,
             progress: bool = True, out: str | Path | None = None, keep: dict | None = None) -> dict:
    """Subject-level metrics of a run's model on a store, per split (participants the run never
    saw form the split ``external``). ``out``: the file the metrics go to; each participant's outputs are kept
    beside it until it is written (``neurox.io.claim.discard_parts``), so that an interrupted evaluate resumes.
    ``keep``: a dict that receives each split's participants, outputs and labels (``objectives.in_units``), for a
    paired comparison with another model."""
    from neurox.hub import load_pretrained, weights_digest
    from neurox.io.claim import resolved
    from neurox.train.folds import evaluate_ensemble, is_cross_validated

    run_dir = Path(run_dir)
    if is_cross_validated(run_dir):
        return evaluate_ensemble(run_dir, store_path, batch_size, n_boot, progress, out, keep)
    config, targets, splits = load_run(run_dir)
    store = Store(store_path)
    model = load_pretrained(run_dir / "model")
    env = dist_utils.detect("auto")  # the accelerator when there is one, else the CPU
    check_model_store(model, store, env.is_main)
    cohort, _ = cohort_with(store, targets, splits)
    if not cohort.participants:
        raise ValueError(f"{store.root}: no participant with prepared runs has a value of "
                         f"{', '.join(t.column for t in targets)} in its participants.tsv, so there is nothing to "
                         "score; neurox predict writes the model's outputs without labels")
    if env.is_main:
        cohort.say_left_out("evaluate", "empty, n/a, or not a class the model learned")
    model.to(env.device)
    motion = participant_motion(store)
    cache = shared_parts(Path(out), {"model": weights_digest(run_dir / "model"), "store": resolved(store.root)},
                         env) if out else None
    results = {}
    for split in ("train", "val", "test", "external"):
        if cohort.in_split(split):
            who, outputs = participant_outputs(model, store, cohort, cohort.in_split(split), env, batch_size, cache,
                                               f"evaluate {split}", progress)
            labels = {p: cohort.labels(p) for p in set(who)}
            results[split], subjects, subject_outputs = subject_metrics(targets, who, outputs, labels, n_boot,
                                                                        motion=motion)
            if keep is not None:
                keep[split] = in_units(targets, subjects, subject_outputs, labels)
    return results


def predict(run_dir: str | Path, store_path: str | Path, out: str | Path, batch_size: int = 4,
            progress: bool = True) -> Path:
    """One row per participant of the store: the model's output and prediction per target. Each participant's
    window outputs are kept beside ``out`` until it is written, so that an interrupted predict resumes; a
    participant whose frames cannot be read is said in one line and left out."""
    from neurox.hub import load_pretrained, weights_digest
    from neurox.io.claim import discard_parts, resolved
    from neurox.train.folds import is_cross_validated, predict_ensemble

    run_dir, out = Path(run_dir), Path(out)
    if is_cross_validated(run_dir):
        return predict_ensemble(run_dir, store_path, out, batch_size, progress)
    _, targets, splits = load_run(run_dir)
    store = Store(store_path)
    model = load_pretrained(run_dir / "model")
    env = dist_utils.detect("auto")  # the accelerator when there is one, else the CPU
    check_model_store(model, store, env.is_main)
    cohort, truth = cohort_with(store, targets, splits, require_values=False)
    model.to(env.device)
    cache = shared_parts(out, {"model": weights_digest(run_dir / "model"), "store": resolved(store.root)}, env)
    who, outputs = participant_outputs(model, store, cohort, cohort.participants, env, batch_size, cache,
                                       "predict", progress)
    from neurox.train.metrics import aggregate

    subjects, subject_outputs = aggregate(who, outputs)
    rows = []
    for split in ("train", "val", "test", "external"):
        members = [i for i, p in enumerate(subjects) if cohort.split.get(p) == split]
        rows += prediction_rows(targets, truth, split, [subjects[i] for i in members], subject_outputs[members])
    add_gaps(targets, rows)  # corrected as the run fitted it (a run without a fit: on its validation participants)
    if env.is_main:
        write_predictions(out, targets, rows, participant_motion(store), cohort.person)
        discard_parts(out)
    return out


def shared_parts(out: Path, settings: dict, env: dist_utils.Env) -> Path:
    """``kept_parts`` made (or emptied) by the first process alone, the others waiting until it is."""
    from neurox.io.claim import kept_parts, parts_folder

    cache = kept_parts(out, settings) if env.is_main else parts_folder(out)
    dist_utils.barrier()
    return cache


def prediction_rows(targets, truth: dict[str, list[str]], split, subjects, outputs) -> list[dict]:
    """One row per participant: output (logit, the value in the target's units, or for several classes each
    one's probability), prediction, and the true value where known."""
    rows = []
    for p, out in zip(subjects, outputs):
        row = {"participant_id": p, "split": split}
        known = truth.get(p)
        if targets[0].task == "multiclass":
            target = targets[0]
            shifted = np.exp(out - out.max())  # the softmax of the participant's mean logits
            for label, probability in zip(target.classes, shifted / shifted.sum()):
                row[f"{target.column}_probability_{label}"] = round(float(probability), 6)
            row[f"{target.column}_predicted"] = target.decode(out[None])[0]
            row[f"{target.column}_true"] = known[0] if known else ""
            rows.append(row)
            continue
        for i, t in enumerate(targets):
            value = float(out[i]) * t.std + t.mean if t.task == "regression" else float(out[i])
            row[f"{t.column}_output"] = round(value, 6)
            row[f"{t.column}_predicted"] = round(value, 6) if t.task == "regression" else \
                t.decode(out[None, i : i + 1])[0]
            row[f"{t.column}_true"] = known[i] if known else ""
        rows.append(row)
    return rows


def prediction_outputs(targets: list[Target], row: dict) -> np.ndarray:
    """A prediction row's outputs as the pooled metrics read them: logits, values in units, or for several
    classes the log of each probability (their softmax is the probabilities again)."""
    if targets[0].task == "multiclass":
        t = targets[0]
        return np.log(np.clip([float(row[f"{t.column}_probability_{c}"]) for c in t.classes], 1e-12, None))
    return np.array([float(row[f"{t.column}_output"]) for t in targets])


def prediction_labels(targets: list[Target], row: dict) -> list[float]:
    """A prediction row's true values as the metrics read them: a class's index, a number in its units."""
    columns = targets[:1] if targets[0].task == "multiclass" else targets
    return [float(row[f"{t.column}_true"]) if t.task == "regression" else t.encode(row[f"{t.column}_true"])
            for t in columns]


def predictions_of(run_dir: str | Path, split: str = "test") -> tuple[list[Target], tuple]:
    """A run's targets, and its ``predictions.tsv`` rows of ``split`` as ``objectives.in_units`` triples
    (participants, outputs, labels in units), for ``objectives.compare_models`` without rescoring the model."""
    from neurox.data.store import read_tsv

    run_dir = Path(run_dir)
    targets = read_targets(run_dir)
    rows = [r for r in read_tsv(run_dir / "predictions.tsv") if r["split"] == split]
    width = 1 if targets[0].task == "multiclass" else len(targets)
    labels = np.array([prediction_labels(targets, r) for r in rows]).reshape(len(rows), width)
    outputs = np.stack([prediction_outputs(targets, r) for r in rows]) if rows else np.zeros((0, 1))
    return targets, ([r["participant_id"] for r in rows], outputs, labels)


def add_gaps(targets: list[Target], rows: list[dict], fit_on: list[dict] | None = None) -> bool:
    """Beside each regression target's prediction where the true value is known: ``{col}_gap``, predicted minus
    true (for age, the brain-age gap), and ``{col}_gap_corrected``, the gap less its linear fit on the true value
    over the validation participants (or the rows ``fit_on``: cross-validation fits it on the other folds). Any
    model that errs shrinks its predictions towards the mean, so the raw gap of the oldest is negative and of the
    youngest positive whatever their brains; the corrected one is not (the residual correction of Beheshti et al.
    2019, fitted on participants the model did not train on). The fit is made once, into ``Target.gap_fit``, and
    applied as it is to every later prediction (``neurox predict`` on new participants). Returns whether a fit was
    made."""
    fitted = False
    for t in [t for t in targets if t.task == "regression"]:
        true, predicted = f"{t.column}_true", f"{t.column}_predicted"
        known = [r for r in rows if r.get(true) not in ("", None)]
        for r in known:
            r[f"{t.column}_gap"] = round(r[predicted] - float(r[true]), 6)
        source = [r for r in rows if r["split"] == "val"] if fit_on is None else fit_on
        line = [r for r in source if r.get(true) not in ("", None)]
        truth = [float(r[true]) for r in line]
        if t.gap_fit is None and len(line) >= 3 and np.ptp(truth) > 0:
            slope, intercept = np.polyfit(truth, [r[predicted] - v for r, v in zip(line, truth)], 1)
            t.gap_fit, fitted = [float(intercept), float(slope)], True
        if t.gap_fit:
            intercept, slope = t.gap_fit
            for r in known:
                r[f"{t.column}_gap_corrected"] = round(r[f"{t.column}_gap"] - intercept - slope * float(r[true]), 6)
    return fitted


def write_predictions(path: Path, targets, rows, motion: dict[str, float] | None = None,
                      person: dict[str, str] | None = None) -> None:
    """predictions.tsv; with ``motion`` (participant -> mean framewise displacement), that as the last
    column, for analyses that account for it. Where the rows are participants' sessions (``person``: unit ->
    participant), ``person`` and ``session`` follow ``participant_id``, for analyses across visits."""
    if motion:
        rows = [{**row, "mean_fd": motion.get(row["participant_id"], "")} for row in rows]
    columns = ["participant_id", "split"]
    if person and any(person.get(r["participant_id"], r["participant_id"]) != r["participant_id"] for r in rows):
        for row in rows:
            who = person.get(row["participant_id"], row["participant_id"])
            row.update(person=who, session=row["participant_id"].removeprefix(f"{who}_ses-") if
                       row["participant_id"] != who else "")
        columns = ["participant_id", "person", "session", "split"]
    for row in rows:
        columns += [c for c in row if c not in columns]
    write_tsv(path, rows, columns)


def cohort_with(store: Store, targets: list[Target], splits: dict[str, str],
                 require_values: bool = True) -> tuple[Cohort, dict[str, list[str]]]:
    """The store's participants under a run's fixed target encoding and split, and the true values
    where known. Without ``require_values``, participants lacking a value are kept (for prediction)."""
    runs, n_frames = prepared_runs(store)
    table = {row["participant_id"]: row for row in store.phenotypes()}
    values, truth, left_out = {}, {}, 0
    for pid in sorted(runs):
        raw = [str(table.get(pid, {}).get(t.column, "")).strip() for t in targets]
        usable = all(usable_value(t, v) for t, v in zip(targets, raw))
        if usable:
            truth[pid] = raw
        elif require_values:
            left_out += 1
            continue
        # encoded labels are needed for every window; unknown ones get a placeholder never scored
        values[pid] = raw if usable else [t.classes[0] if t.classes else str(t.mean) for t in targets]
    cohort = Cohort(targets, sorted(values), values, {p: runs[p] for p in values}, n_frames, left_out=left_out,
                    person={p: table.get(p, {}).get("person", p) for p in values})
    cohort.split = {p: splits.get(p, "external") for p in values}
    return cohort, truth


def usable_value(target: Target, value: str) -> bool:
    if value in ("", "n/a", "NA", "nan"):
        return False
    if target.task == "regression":
        try:
            float(value)
        except ValueError:
            return False
        return True
    return value in target.classes


def store_contract(info: dict) -> dict:
    """What a model trained on a store records of it in its input contract, as the store says it (not as the
    model's grid would suggest: a 48^3 grid may hold 2 mm voxels of a smaller box)."""
    return {"normalization": info["normalization"], "denoising": info.get("denoising", "none"),
            "voxel_size_mm": info["voxel_size_mm"], "crop_box": tuple(tuple(b) for b in info["crop_box_mm"]),
            "tr_resampled": info.get("resample_tr") is not None, "space": store_template(info),
            "bold_desc": info.get("bold_desc", "preproc")}


def store_template(info: dict) -> str | None:
    """The MNI template a store's runs are in (``MNI152NLin2009cAsym``), ``None`` where no input file named it."""
    space = info.get("space")
    return None if space in (None, UNNAMED_TEMPLATE) else space


def check_trs(stores: list[Store], announce: bool = True) -> None:
    """A window of so many frames spans one length of time only where the runs share a TR: stores whose TRs
    (each store's median) differ by more than ``TR_TOLERANCE`` are refused together, and a store whose own runs do
    is a warning (printed when ``announce``). ``prepare --resample_tr`` gives every run one TR."""
    medians = []
    for store in stores:
        trs = sorted(float(row["tr"]) for row in store.manifest if row.get("tr") and row.get("status") == "ok")
        if not trs:
            continue
        if announce and trs[-1] / trs[0] - 1 > TR_TOLERANCE:
            print(f"warning: the store {store.root} holds runs of TR {trs[0]:g} to {trs[-1]:g} s, so a window spans "
                  f"{trs[-1] / trs[0]:.1f} times as long in some as in others; neurox prepare ... --resample_tr "
                  "SECONDS gives every run one TR", file=sys.stderr)
        medians.append((store, float(np.median(trs))))
    for store, tr in medians[1:]:
        first, first_tr = medians[0]
        if abs(tr / first_tr - 1) > TR_TOLERANCE:
            raise ValueError(f"{store.root} has runs of TR {tr:g} s but {first.root} of {first_tr:g} s; stores trained "
                             f"together must share a TR within {TR_TOLERANCE:.0%} (prepare them with the same "
                             f"--resample_tr, for example {first_tr:g})")


def store_tr(store: Store) -> float | None:
    """The store's repetition time when every run shares one, else None."""
    trs = {row["tr"] for row in store.manifest if row.get("tr")}
    return float(trs.pop()) if len(trs) == 1 else None
