"""The options of every ``neurox`` command: one parser per command, each with a help line per option
and an example. ``cli.py`` runs them."""

from __future__ import annotations

import inspect

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import PositiveInt


class HelpFormatter(DefaultHelpFormatter):
    """An option whose help already says what its absence means ("(default: all)") does not also show
    "default: null"."""

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        if "(default:" in (action.help or "") and action.default is None:
            text = text.replace(", default: %(default)s)", ")").replace(" (default: %(default)s)", "")
        return text


def describe_options(parser: ArgumentParser, config_class) -> ArgumentParser:
    """Each option's help from the comment on its field in the config dataclass: the comments readers
    of the code see are the ones ``--help`` shows, one source for both."""
    import io
    import tokenize

    comments, field = {}, None
    for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(config_class)).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and field is None:
            field = token.string  # a field's name starts its line, indented once
        elif token.type == tokenize.COMMENT and field:
            comments[field] = token.string.lstrip("# ").strip()
        elif token.type in (tokenize.NEWLINE, tokenize.NL):
            field = None
    for action in parser._actions:
        if action.dest in comments and not action.help:
            action.help = comments[action.dest]
    return parser


def _convert_swift_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Convert a published SwiFT checkpoint (Lightning .ckpt or safetensors) into a neurox "
        "model directory. The architecture comes from the checkpoint's hyper-parameters where it has "
        "them; flags set or override it; anything else is the paper configuration.",
        epilog="example: neurox convert-swift swift_ukb_sex.ckpt models/swift-ukb-sex",
    )
    p.add_argument("checkpoint", help="published checkpoint (.ckpt, .pt or .safetensors)")
    p.add_argument("out_dir", help="model directory to write")
    p.add_argument("--task", choices=["binary", "multiclass", "regression"], default=None,
                   help="what the head predicts, when the checkpoint does not say")
    for name, kind in (("img_size", "int*4"), ("in_chans", "int"), ("embed_dim", "int"),
                       ("patch_size", "int*4"), ("window_size", "int*4"), ("first_window_size", "int*4"),
                       ("depths", "int+"), ("num_heads", "int+"), ("c_multiplier", "int")):
        nargs = {"int*4": 4, "int+": "+", "int": None}[kind]
        p.add_argument(f"--{name}", type=int, nargs=nargs, default=None,
                       help="architecture, where the checkpoint does not record it (or to override it)")
    p.add_argument("--last_layer_full_msa", type=bool, default=None,
                   help="architecture, where the checkpoint does not record it (or to override it)")
    return p


def _smoke_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Run the SwiFT backbone forward and backward on generated input and report shapes, "
        "parameter count and timing: a check that the installation works.",
        epilog="example: neurox smoke --preset demo --batch 2",
    )
    p.add_argument("--preset", default="demo", help="model preset: demo or swift_paper")
    p.add_argument("--batch", type=int, default=1, help="windows in the generated batch")
    p.add_argument("--out", default=None, help="also save the (random) model as a model directory here")
    return p


def _prepare_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Preprocess fMRI runs into a chunked store: reorient to RAS, brain mask (given or computed), "
        "cut (onto larger voxels, average; with --resample, interpolate) onto a box fixed in MNI coordinates, "
        "normalise, float16. "
        "Finished runs are skipped on a re-run; a bad run is reported in failures.tsv and the rest go on. "
        "Exit status: 0 all runs prepared, 3 some runs failed, 1 nothing could be done.",
        epilog="example: neurox prepare /data/ukb/derivatives/fmriprep --out /scratch/ukb-store --workers 8;  "
        "HCP: neurox prepare /data/HCP_1200 --task rest --participants unrestricted.csv --id_column Subject "
        "--out /scratch/hcp-store",
    )
    p.add_argument("input", help="BIDS derivatives folder (fMRIPrep), HCP-pipeline folder (<subject>/MNINonLinear/"
                   "Results/<run>/<run>.nii.gz), a .nii[.gz] run, or a TSV manifest (participant_id, path, optional "
                   "session, run, mask, confounds)")
    p.add_argument("--out", required=True, help="store folder to create or complete")
    p.add_argument("--participants", default=None,
                   help="phenotype table, .tsv or .csv (default: INPUT/participants.tsv)")
    p.add_argument("--id_column", default=None, help="the phenotype table's participant id column (default "
                   "participant_id; HCP: Subject, UK Biobank: eid); 100307 and sub-100307 name one participant")
    p.add_argument("--session_column", default=None, help="the phenotype table's session column, for a row per "
                   "session (age at each visit; ABCD: eventname): each session is then one unit of labels and "
                   "metrics, a participant's sessions share one split (default: a column named session, if any)")
    p.add_argument("--max_mean_fd", type=float, default=None,
                   help="mm: runs whose mean framewise displacement is above this are kept in the store but marked "
                   "excluded in manifest.tsv, and no command reads them (a re-run with another value re-marks them; "
                   "0 removes the threshold; runs without motion are never excluded)")
    p.add_argument("--task", default=None, help="only the runs of this task (BIDS task label; HCP: rest for rfMRI_*, "
                   "wm for tfMRI_WM_*); default every run found")
    p.add_argument("--space", default=None, help="fMRIPrep folders with runs in several MNI output spaces: the one to "
                   "take, as fMRIPrep names it: MNI152NLin6Asym:res-2 (MNIPediatricAsym:cohort-2:res-2), or "
                   "MNI152NLin6Asym (its one resolution, or the one written without res-) (default: the one MNI "
                   "space found)")
    p.add_argument("--desc", default=None, help="fMRIPrep-layout folders: the desc- of the BOLD runs to read, "
                   "smoothAROMAnonaggr for fMRIPrep's ICA-AROMA-denoised runs (its 20.2 LTS, --use-aroma) or another "
                   "pipeline's label; the store and models trained on it record it, --like takes it (default: "
                   "preproc)")
    p.add_argument("--hcp_bold", default="minimal",
                   help="HCP-pipeline folders: minimal (<run>.nii.gz, minimally preprocessed), fix "
                   "(<run>_hp2000_clean.nii.gz, cleaned by ICA-FIX), or a suffix of the run file's name "
                   "(_hp0_clean: <run>_hp0_clean.nii.gz)")
    p.add_argument("--like", default=None, help="apply this model directory's input contract instead of the flags")
    p.add_argument("--voxel_size", type=float, default=2.0, help="target voxel size in mm (2, or 4 for small models)")
    p.add_argument("--grid", type=int, nargs=3, default=None, help="target grid (default 96^3 at 2 mm, 48^3 at 4 mm)")
    p.add_argument("--normalization", choices=["global_zscore", "voxel_zscore", "voxel_center"],
                   default="global_zscore",
                   help="global_zscore: the published recipe, what published SwiFT checkpoints expect (one z-score "
                   "over in-brain voxels of the whole run, background set to the minimum); voxel_zscore: each voxel "
                   "over time, background 0; voxel_center: each voxel's mean removed, one brain-wide temporal scale, "
                   "background 0 (recommended for training from scratch: see docs/training.md)")
    p.add_argument("--confounds", choices=["none", "simple", "compcor"], default="none",
                   help="regress these fMRIPrep confounds out of every voxel before normalising (docs/data.md): "
                   "simple (24 motion parameters, white matter, CSF, cosine drift) or compcor (24 motion, 5 "
                   "anatomical CompCor, cosine drift); the store and models trained on it record it")
    p.add_argument("--global_signal", type=bool, default=False, help="regress the global signal out too")
    p.add_argument("--non_steady_state", choices=["drop", "keep"], default=None,
                   help="the leading frames a run's fMRIPrep confounds mark non_steady_state_outlier (brighter while "
                   "the magnetisation settles; without fMRIPrep's table, those its first 40 frames show): drop them "
                   "from the store, or keep them (default: drop in a new store; in an existing one, as its runs "
                   "were prepared)")
    p.add_argument("--resample", type=bool, default=False, help="interpolate inputs whose grid does not align (runs "
                   "onto larger voxels on the same centres, 2 mm onto the 4 mm grid, are averaged without it)")
    p.add_argument("--min_frames", type=int, default=20, help="runs shorter than this (one window) are refused")
    p.add_argument("--tr", type=float, default=None,
                   help="TR in seconds where no sidecar or header gives one, or the header's is not in seconds")
    p.add_argument("--resample_tr", type=float, default=None,
                   help="seconds: resample every run in time onto this TR (band-limited, after normalising), so that "
                   "cohorts scanned at different TRs give windows of one length in seconds (docs/data.md); --like "
                   "MODEL_DIR of a model trained on resampled runs resamples onto its TR without it")
    p.add_argument("--workers", type=PositiveInt, default=1, help="runs prepared in parallel")
    p.add_argument("--shard", default="0/1", help="i/N: prepare only every N-th run from the i-th (array jobs)")
    p.add_argument("--format", choices=["zarr", "npy"], default="zarr",
                   help="zarr (compressed, one shard per run) or npy (uncompressed, memory-mapped)")
    p.add_argument("--dry_run", type=bool, default=False,
                   help="read the runs' headers only and say what would be prepared and what would fail (TRs, grids, "
                   "masks, confounds, denoising); nothing is written")
    p.add_argument("--quiet", type=bool, default=False, help="no progress bar")
    return p


def _synth_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Write a synthetic cohort (fMRIPrep BIDS-derivatives layout on the MNI152 brain) with planted "
        "effects and their ground-truth maps: amplitude_group (local), coupling_group (distributed), "
        "order_group (temporal order only) and lowfreq_score (continuous).",
        epilog="example: neurox synth synthetic-cohort --n_subjects 40 --n_frames 120 --voxel_size 4",
    )
    p.add_argument("out", help="folder to write")
    p.add_argument("--n_subjects", type=int, default=40, help="participants (half in each group of each effect)")
    p.add_argument("--n_runs", type=int, default=1, help="runs per participant")
    p.add_argument("--n_frames", type=int, default=120, help="frames per run")
    p.add_argument("--tr", type=float, default=0.8, help="repetition time in seconds")
    p.add_argument("--voxel_size", type=float, default=2.0, help="2 (MNI 2 mm) or 4")
    p.add_argument("--effect_size", type=float, default=1.0, help="strength of every planted effect (0: none)")
    p.add_argument("--noise", type=float, default=1.0, help="scale of the spatially smooth noise")
    p.add_argument("--motion_spikes", type=bool, default=True, help="intensity spikes where the head jumps "
                   "(about one frame in 60, in the confounds too)")
    p.add_argument("--motion_effect", type=float, default=0.0, help="above 0: a motion_group column, no neural "
                   "effect, whose group 1 has (1 + this) times the head jumps: a confound for the motion check")
    p.add_argument("--n_parcels", type=int, default=40,
                   help="parcels of the atlas; the eight networks are made of bilateral pairs of them")
    p.add_argument("--non_steady_frames", type=int, default=0, help="leading frames of each run brighter while the "
                   "magnetisation settles (the first half as bright again, then halving), marked "
                   "non_steady_state_outlier in the confounds as fMRIPrep does")
    p.add_argument("--seed", type=int, default=0, help="the same options and seed give the same bytes")
    p.add_argument("--workers", type=PositiveInt, default=1,
                   help="runs written in parallel (same bytes for any number)")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _finetune_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile

    from neurox.train.finetune import FinetuneConfig

    p = ArgumentParser(
        description="Train a model to predict phenotype column(s) from a store: participant-level splits, "
        "subject-level metrics with bootstrap intervals, test metrics from the best validation checkpoint, whose "
        "class decision is recentred on the validation participants (output 0: halfway between the two classes' "
        "median outputs; several classes: one offset per class, so that none is favoured). Runs on one CPU, one "
        "GPU, or many processes (torchrun, srun, mpiexec).",
        epilog="example: neurox finetune --store synthetic-store --target amplitude_group --out runs/amp --epochs 8",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_class_arguments(FinetuneConfig, fail_untyped=False)
    describe_options(p, FinetuneConfig)
    return p


def _pretrain_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile

    from neurox.train.pretrain import PretrainConfig

    p = ArgumentParser(
        description="Self-supervised pretraining on one or many stores (no labels): contrastive (NT-Xent, instance "
        "or local_temporal mode) or masked image modelling. Stores are sampled with --store_weight and must share "
        "one input contract. Runs on one CPU, one GPU, or many processes and nodes (torchrun, srun, mpiexec; DDP "
        "or --strategy fsdp); sharded checkpoints resume on any number of processes. Writes OUT/model, which "
        "neurox finetune --init takes.",
        epilog="example: neurox pretrain --store ukb-store --store hcp-store --store_weight [2,1] "
        "--objective contrastive --out runs/pretrain --epochs 100",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_argument("--store", action="append", default=[], help="a store; repeat it for several")
    p.add_class_arguments(PretrainConfig, fail_untyped=False, skip={"store"})
    describe_options(p, PretrainConfig)
    return p


def _evaluate_parser() -> ArgumentParser:
    p = ArgumentParser(description="Subject-level metrics of a trained run on a store, per split, with 95% "
                       "bootstrap intervals; --baseline puts an FC baseline run beside it, --compare another run, each "
                       "with the paired difference on the same participants.",
                       epilog="example: neurox evaluate runs/amp --store synthetic-store --baseline runs/amp-fc")
    p.add_argument("run", help="run directory from neurox finetune (of finetune --folds: its folds' models "
                   "together, on the participants none of them saw)")
    p.add_argument("--store", required=True, help="a store from neurox prepare")
    p.add_argument("--baseline", default=None, help="run directory from neurox baseline")
    p.add_argument("--compare", default=None, help="another finetune run of the same targets (from scratch beside "
                   "a pretrained one): scored alike, and each metric's paired difference on the same participants")
    p.add_argument("--batch_size", type=PositiveInt, default=4, help="windows per forward pass")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _predict_parser() -> ArgumentParser:
    p = ArgumentParser(description="Per-participant predictions of a trained run on a store (mean of window "
                       "outputs), with each participant's split in the run.",
                       epilog="example: neurox predict runs/amp --store other-store --out predictions.tsv")
    p.add_argument("run", help="run directory from neurox finetune (of finetune --folds: its folds' models "
                   "together, on the participants none of them saw)")
    p.add_argument("--store", required=True, help="a store from neurox prepare")
    p.add_argument("--out", required=True, help="the table to write (TSV)")
    p.add_argument("--batch_size", type=PositiveInt, default=4, help="windows per forward pass")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _baseline_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile

    from neurox.analysis.baseline import BaselineConfig

    p = ArgumentParser(
        description="The FC + linear baseline: per participant the Fisher-z correlation matrix of an atlas' parcel "
        "series (or, --kind tangent, its tangent-space projection at the training participants' mean), a "
        "cross-validated logistic (classes) or ridge (numbers) model fitted on the training participants, "
        "metrics on the same validation and test participants as a finetune run (--split_from).",
        epilog="example: neurox baseline --store synthetic-store --target coupling_group "
        "--atlas synthetic-cohort/ground_truth/atlas-synthetic_space-MNI152NLin2009cAsym_res-4_dseg.nii.gz "
        "--split_from runs/model --out runs/fc",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_class_arguments(BaselineConfig, fail_untyped=False, skip={"covariates"})
    p.add_argument("--covariates", nargs="+", default=None, help="phenotype columns (numbers or labels), or "
                   "mean_fd (head motion), regressed out of the features, fitted on the training participants")
    describe_options(p, BaselineConfig)
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _connectivity_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Functional connectivity of a store: each run's parcel time series (an atlas NIfTI in MNI space, "
        "resampled onto the store grid by nearest neighbour) and each participant's correlation matrix (mean over "
        "runs), written as arrays with participant ids and parcel labels, plus a group-mean matrix plot.",
        epilog="example: neurox connectivity --store synthetic-store --atlas "
        "synthetic-cohort/ground_truth/atlas-synthetic_space-MNI152NLin2009cAsym_res-4_dseg.nii.gz "
        "--group_by coupling_group --out fc",
    )
    p.add_argument("--store", required=True, help="a store from neurox prepare")
    p.add_argument("--atlas", required=True, help="3D label NIfTI in MNI space (Schaefer, the synthetic parcels...)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--kind", choices=["plain", "fisher_z", "partial", "tangent"], default="fisher_z",
                   help="Pearson correlation, its Fisher z, partial correlation (from the precision matrix), or the "
                   "tangent space at the participants' geometric mean (shrunk correlations; see docs/analysis.md)")
    p.add_argument("--confounds", choices=["none", "simple", "scrubbing", "compcor"], default="none",
                   help="denoise each run's parcel series with its fMRIPrep confounds: simple (24 motion, WM, CSF, "
                   "cosines), scrubbing (simple, and frames above --fd_threshold dropped), compcor (24 motion, 5 "
                   "aCompCor, cosines); see docs/analysis.md")
    p.add_argument("--fd_threshold", type=float, default=0.5, help="scrubbing: framewise displacement (mm) above "
                   "which a frame is dropped")
    p.add_argument("--global_signal", type=bool, default=False, help="regress the global signal too")
    p.add_argument("--names", default=None, help="TSV with index and name columns (default: found beside the atlas)")
    p.add_argument("--participants", nargs="+", default=None, help="only these participants (default: all)")
    p.add_argument("--group_by", default=None, help="a phenotype column: a group-mean matrix per value, a plot of "
                   "each and their difference, and edgewise statistics (two groups, or a numeric column's slope) in "
                   "edges.tsv, FDR-corrected (and per network block in network_edges.tsv, where the atlas' names "
                   "table has a network column or Schaefer names)")
    p.add_argument("--covariates", nargs="+", default=None, help="phenotype columns (numbers, or labels such as "
                   "site: an indicator per level), or mean_fd (head motion), adjusted for in the edgewise statistics")
    p.add_argument("--harmonize", default=None, help="a site or scanner column: ComBat across its values before the "
                   "edgewise statistics, the --group_by effect and --covariates preserved (neuroCombat's design)")
    p.add_argument("--nbs", type=float, default=None, help="network-based statistic: the t above which (or below "
                   "minus which) edges form components, each given a family-wise p-value from --permutations "
                   "(Freedman-Lane with --covariates); 3 to 3.5 are usual. Writes nbs.tsv")
    p.add_argument("--permutations", type=PositiveInt, default=1000, help="--nbs: permutations of the participants")
    p.add_argument("--seed", type=int, default=0, help="--nbs: of the permutations")
    p.add_argument("--workers", type=PositiveInt, default=1,
                   help="processes reading the runs' frames (each holds one run), and for --kind tangent its passes")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _explain_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Which voxels drove a trained model's output: Integrated Gradients (optionally with a "
        "SmoothGrad-squared noise tunnel) over every window of the chosen participants, reduced over time into a "
        "3D map per participant (NIfTI on the participant's original grid and on the store's MNI grid), group "
        "maps (all, and per class or quantile of --group_by) and the contrast between groups, with glass-brain "
        "PNGs. Needs captum. Participants whose maps exist are skipped, so an interrupted run resumes.",
        epilog="example: neurox explain runs/amp --store synthetic-store --split test --group_by amplitude_group "
        "--out explain/amp",
    )
    p.add_argument("run", help="run directory from neurox finetune (of finetune --folds: each participant by the "
                   "model of the fold that tested them)")
    p.add_argument("--store", required=True, help="a store from neurox prepare")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--subject", nargs="+", default=None, help="these participants")
    p.add_argument("--split", choices=["train", "val", "test", "external"], default=None,
                   help="participants of this split of the run")
    p.add_argument("--where", default=None, help="COLUMN=VALUE: participants with this phenotype value")
    p.add_argument("--group_by", default=None, help="a phenotype column: one group map per class (or quantile) "
                   "and their contrast (second minus first class, top minus bottom quantile)")
    p.add_argument("--quantiles", type=int, default=4, help="groups of a numeric --group_by column")
    p.add_argument("--target", default=None, help="the run's target column to explain (default: its first)")
    p.add_argument("--class_value", default=None, help="multiclass: the class to explain (default: the first)")
    p.add_argument("--n_steps", type=int, default=16, help="Integrated Gradients steps")
    p.add_argument("--noise_samples", type=int, default=0, help="> 0: SmoothGrad-squared with this many samples")
    p.add_argument("--noise_std", type=float, default=0.1, help="noise, as a fraction of the window's std")
    p.add_argument("--baseline", choices=["zero", "temporal_mean"], default="zero",
                   help="the reference input: zeros, or each voxel's mean over the window (no fluctuation)")
    p.add_argument("--reduce", choices=["abs", "signed"], default="abs", help="sum over time of |attribution| or of it")
    p.add_argument("--smooth_fwhm", type=float, default=6.0,
                   help="mm: Gaussian smoothing inside the brain of the group and contrast maps (0: none)")
    p.add_argument("--atlas", default=None, help="3D label NIfTI in MNI space: also rank its regions by attribution "
                   "(regions.tsv, participant_regions.tsv)")
    p.add_argument("--names", default=None, help="TSV with index and name columns (default: found beside the atlas)")
    p.add_argument("--batch_size", type=PositiveInt, default=2, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (the accelerator if any), cpu, cuda, xpu ...")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _embed_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Per-window and per-participant embeddings (the backbone's output averaged over space and time) "
        "with participant ids, split and phenotypes, as TSV or Parquet, and a PCA plot coloured by a column.",
        epilog="example: neurox embed runs/amp --store synthetic-store --out embeddings.tsv --color_by amplitude_group",
    )
    p.add_argument("model", help="run directory from neurox finetune, or a model directory")
    p.add_argument("--store", required=True, help="a store from neurox prepare")
    p.add_argument("--out", required=True, help="table of participants (.tsv or .parquet); the windows' table and "
                   "the PCA plot go beside it")
    p.add_argument("--color_by", default=None, help="phenotype column (or 'split') to colour the PCA plot by")
    p.add_argument("--batch_size", type=PositiveInt, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (the accelerator if any), cpu, cuda, xpu ...")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _probe_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="A linear probe of a frozen model: each participant's embedding (mean over windows; with "
        "--pool mean_std also each feature's standard deviation over time; --pool tokens: both per position; "
        "--stage: of an earlier stage), a cross-validated logistic or ridge model fitted on the training "
        "participants, metrics on validation and test participants with bootstrap intervals. --split_from RUN "
        "scores the same participants as that run.",
        epilog="example: neurox probe runs/pretrain/model --store synthetic-store --target amplitude_group "
        "--split_from runs/amp --out runs/probe",
    )
    p.add_argument("model", help="a model directory (pretrained, converted) or a finetune run")
    p.add_argument("--store", required=True, help="a store from neurox prepare")
    p.add_argument("--target", required=True, help="phenotype column(s), comma-separated")
    p.add_argument("--out", default=None, help="folder for metrics.json and splits.tsv")
    p.add_argument("--split_from", default=None, help="a finetune run whose splits.tsv to use")
    p.add_argument("--seed", type=int, default=0, help="the split's seed when there is no --split_from")
    p.add_argument("--split_by", default=None, help="without --split_from, a phenotype column (family ID, site) "
                   "whose members share one side of the split (or of the folds)")
    p.add_argument("--folds", type=int, default=None, help="k-fold cross-validation instead of one split: every "
                   "participant tested once, by a probe fitted on the other folds (metrics cv, cv_fold1, ...)")
    p.add_argument("--covariates", nargs="+", default=None, help="phenotype columns (numbers or labels), or "
                   "mean_fd (head motion), regressed out of the embeddings, fitted on the training participants")
    p.add_argument("--harmonize", default=None, help="a site or scanner column: ComBat across its values, fitted on "
                   "the training participants, before --covariates")
    p.add_argument("--where", default=None, help="COLUMN=VALUE: only these participants")
    p.add_argument("--pool", choices=["mean", "mean_std", "tokens"], default="mean",
                   help="mean: the representation averaged over space and time (what the heads see); mean_std: "
                   "also each feature's standard deviation over time (statistics pooling); tokens: the mean and "
                   "standard deviation over time of each feature at each position (keeps where)")
    p.add_argument("--stage", type=int, default=None,
                   help="probe this stage's output (1 = the first, finest) instead of the last's, before its patch "
                   "merging: with --pool tokens, local effects at a finer resolution")
    p.add_argument("--batch_size", type=PositiveInt, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (the accelerator if any), cpu, cuda, xpu ...")
    p.add_argument("--quiet", type=bool, default=False, help="no progress display")
    return p


def _demo_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="The whole path on a synthetic cohort: synth -> prepare -> finetune + FC baseline -> evaluate -> "
        "a short report (metrics table, training curve, where the outputs are). 5-15 minutes on 2 CPU cores.",
        epilog="example: neurox demo --out neurox-demo",
    )
    p.add_argument("--out", default="neurox-demo", help="folder for the cohort, store, runs and report")
    p.add_argument("--n_subjects", type=int, default=96, help="participants of the synthetic cohort")
    p.add_argument("--n_frames", type=int, default=200, help="frames per run")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0, help="of the cohort and of the run")
    p.add_argument("--normalization", choices=["global_zscore", "voxel_zscore", "voxel_center"],
                   default="voxel_center", help="of the prepared store (see neurox prepare --help)")
    p.add_argument("--batch_size", type=PositiveInt, default=16, help="windows per forward pass")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--workers", type=PositiveInt, default=2, help="processes for synth and prepare")
    p.add_argument("--head_init", choices=["random", "probe"], default="probe",
                   help="probe: the head starts as a linear probe of the backbone's features (LP-FT)")
    return p


def build_parser() -> ArgumentParser:
    from neurox import __version__

    parser = ArgumentParser(prog="neurox", description="neurox: foundation models of 4D brain fMRI.")
    parser.add_argument("--version", action="version", version=f"neurox {__version__}")
    sub = parser.add_subcommands(dest="command")
    sub.add_subcommand("convert-swift", _convert_swift_parser(), help="published SwiFT checkpoint -> model dir")
    sub.add_subcommand("synth", _synth_parser(), help="synthetic cohort with planted effects")
    sub.add_subcommand("prepare", _prepare_parser(), help="fMRIPrep/BIDS NIfTI -> chunked store")
    sub.add_subcommand("pretrain", _pretrain_parser(), help="self-supervised pretraining on many stores")
    sub.add_subcommand("finetune", _finetune_parser(), help="train on a store's phenotypes")
    sub.add_subcommand("evaluate", _evaluate_parser(), help="subject-level metrics of a run")
    sub.add_subcommand("predict", _predict_parser(), help="per-participant predictions of a run")
    sub.add_subcommand("baseline", _baseline_parser(), help="FC + linear model on the same split")
    sub.add_subcommand("connectivity", _connectivity_parser(), help="parcel series and connectivity matrices")
    sub.add_subcommand("explain", _explain_parser(), help="attribution maps (NIfTI, PNG) of a trained run")
    sub.add_subcommand("probe", _probe_parser(), help="closed-form linear probe of a frozen model")
    sub.add_subcommand("embed", _embed_parser(), help="window and participant embeddings, PCA plot")
    sub.add_subcommand("demo", _demo_parser(), help="synth -> prepare -> finetune + baseline -> report")
    sub.add_subcommand("smoke", _smoke_parser(), help="forward+backward of the backbone on generated input")
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return parser
