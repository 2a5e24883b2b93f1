"""Finding the runs of HCP-pipeline outputs (the Human Connectome Project's own layout, as the HCP Young
Adult and Lifespan releases ship it):

    <subject>/MNINonLinear/Results/<run>/<run>.nii.gz                 minimally preprocessed, MNI 2 mm
    <subject>/MNINonLinear/Results/<run>/<run>_hp2000_clean.nii.gz    the same, cleaned by ICA-FIX
    <subject>/MNINonLinear/Results/<run>/brainmask_fs.2.nii.gz        the brain mask on that grid
    <subject>/MNINonLinear/Results/<run>/Movement_Regressors.txt      head motion (read as confounds)
    <subject>/MNINonLinear/ROIs/wmparc.2.nii.gz                       FreeSurfer labels on that grid (white
                                                                      matter and CSF signals, CompCor)

The 7T runs' grid is 1.6 mm: ``brainmask_fs.1.60.nii.gz`` and ``wmparc.1.60.nii.gz``.

``<subject>`` may sit up to three folders below the folder given, and inside ``sub-*``/``ses-*`` folders
(pipelines that wrap the HCP layout in BIDS names); the participant is the nearest ``sub-*`` folder, else
the subject folder (``100307`` becomes ``sub-100307``), the session the nearest ``ses-*`` folder.
A run folder's name gives its task: ``rfMRI_REST1_LR`` is task ``rest``, run ``REST1_LR``;
``tfMRI_WM_RL`` task ``wm``, run ``WM_RL``; ``task-rest01`` (the ABCD-BIDS pipeline's
``sub-*/ses-*/files/MNINonLinear/Results/task-rest01``) task ``rest``, run ``01``.
"""

from __future__ import annotations

import re
from pathlib import Path

from neurox.io.bids import RunSpec, entities, sidecar_tr

HCP_BOLD = {"minimal": "{run}.nii.gz", "fix": "{run}_hp2000_clean.nii.gz"}


def bold_name(variant: str) -> str:
    """The run file of a variant: ``minimal``, ``fix``, or any suffix of the run's name (``_hp0_clean``, as
    other releases' ICA-FIX outputs are named)."""
    if variant in HCP_BOLD:
        return HCP_BOLD[variant]
    if variant.startswith("_") and "/" not in variant:
        return "{run}" + variant + ".nii.gz"
    raise ValueError(f"--hcp_bold {variant!r}: give minimal, fix, or a suffix of the run file's name such as "
                     "_hp0_clean")


def hcp_layout(variant: str) -> str:
    return f"<subject>/MNINonLinear/Results/<run>/{bold_name(variant).format(run='<run>')}"


MASK = "brainmask_fs.{resolution}.nii.gz"  # resolution "2" (3T), "1.60" (7T)
SEGMENTATION = "ROIs/wmparc.{resolution}.nii.gz"  # under <subject>/MNINonLinear, on the same grid
MOTION = "Movement_Regressors.txt"
MAX_DEPTH = 3  # subject folders this far below the folder given are found (a cohort, a site, a wrapper)


def discover_hcp(root: Path, bold: str = "minimal") -> list[RunSpec]:
    """Every HCP-pipeline run under ``root`` whose ``bold`` variant (see ``bold_name``) exists."""
    name = bold_name(bold)
    root = root.resolve()
    results = []
    for depth in range(MAX_DEPTH + 1):  # a bounded glob: an HCP subject holds thousands of files
        results += sorted(root.glob("/".join(["*"] * depth + ["MNINonLinear", "Results"])))
    specs = []
    for folder in results:
        for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            path = run_dir / name.format(run=run_dir.name)
            if path.is_file():
                specs.append(_spec(root, run_dir, path))
    return specs


def _spec(root: Path, run_dir: Path, bold: Path) -> RunSpec:
    subject_dir = run_dir.parent.parent.parent  # <subject>/MNINonLinear/Results/<run>
    above = [p.name for p in (subject_dir, *subject_dir.parents) if p == root or root in p.parents]
    participant = next((name for name in above if name.startswith("sub-")), None)
    if participant is None:
        label = subject_dir.name if subject_dir.name != "files" else subject_dir.parent.name
        participant = "sub-" + re.sub(r"[^A-Za-z0-9]", "", label)
    session = next((name[len("ses-"):] for name in above if name.startswith("ses-")), "")
    task, run = run_task(run_dir.name)
    run_id = "_".join(p for p in (participant, f"ses-{session}" if session else "", run_dir.name) if p)
    mask, segmentation = mask_and_labels(run_dir)
    motion = run_dir / MOTION
    return RunSpec(
        participant_id=participant,
        session=session,
        run=run,
        run_id=re.sub(r"[^A-Za-z0-9_.-]", "_", run_id),
        bold=bold,
        mask=mask,
        segmentation=segmentation,
        tr=sidecar_tr(bold),  # HCP ships none; the NIfTI header's TR (0.72 s) is read next
        confounds=motion if motion.is_file() else None,
        space="MNI152NLin6Asym",
        task=task,
    )


def mask_and_labels(run_dir: Path) -> tuple[Path | None, Path | None]:
    """A run's brain mask and its subject's label volume on the same grid, where they exist (the label
    volume ships in the structural package, not with the runs)."""
    masks = sorted(run_dir.glob(MASK.format(resolution="*")), key=lambda p: p.name != MASK.format(resolution="2"))
    if not masks:
        return None, None
    resolution = masks[0].name[len("brainmask_fs.") : -len(".nii.gz")]
    segmentation = run_dir.parent.parent / SEGMENTATION.format(resolution=resolution)
    return masks[0], segmentation if segmentation.is_file() else None


def run_task(name: str) -> tuple[str, str]:
    """(task, run) of an HCP run folder's name: ``rfMRI_REST1_LR`` -> (rest, REST1_LR), ``tfMRI_WM_RL`` ->
    (wm, WM_RL); the ABCD-BIDS (DCAN) pipeline's ``task-rest01`` -> (rest, 01); a BIDS-named folder by its
    entities; anything else (its name lower-cased, its name)."""
    match = re.fullmatch(r"([rt])fMRI_(.+)", name)
    if match:
        task = "rest" if match.group(1) == "r" else match.group(2).split("_")[0].lower()
        return task, match.group(2)
    match = re.fullmatch(r"task-([A-Za-z]+)(\d+)", name)
    if match:
        return match.group(1), match.group(2)
    ent = entities(name)
    if "task" in ent:
        return ent["task"], ent.get("run", "")
    return name.lower(), name
