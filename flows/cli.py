"""The ``dotresize`` command line.

Every user-facing failure prints one line (``dotresize: error: ...``) and exits non-zero, leaving no output
directory behind. Heavy libraries are imported only once the arguments are known to be valid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from .settings import apply_offline_defaults

log = logging.getLogger("dotresize")


class UsageError(Exception):
    """A bad command-line value, reported like an argparse error."""


def _fraction(name: str, interval: str, removed: str):
    """An argparse type: a number in [0, 1) -- the fraction of ``removed`` taken away -- else one line saying so."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in {interval}, got {text!r}") from None
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in {interval} (the fraction of {removed} removed), "
                                             f"got {value}")
        return value

    return parse


#: --ratio: in (0, 1), or 0 (MLP only; checked against --mlp-ratio in cmd_compress)
_ratio = _fraction("ratio", "(0, 1)", "width")
_mlp_ratio = _fraction("mlp ratio", "[0, 1)", "MLP neurons")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# the names of dotresize.evaluation.precision.EVAL_DTYPES (kept here so building the parser needs no torch)
EVAL_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_TARGET_HELP = "a compressed model directory (or its run directory) or models:/NAME/VERSION"

#: the options several subcommands take, declared once (see :func:`_shared`)
_SHARED: dict[str, dict] = {
    "--model": dict(default=None, help="HF model directory, .gguf file, hub id, or smollm2-135m-instruct "
                                       "(default, packaged)"),
    "--mode": dict(choices=("parallel", "sequential"), default="parallel"),
    "--layout": dict(choices=("per-point", "global"), default="per-point"),
    "--calib-data": dict(default="wikitext2", help="wikitext2 (default) or a .txt/.jsonl file"),
    "--calib-samples": dict(type=_positive_int, default=64),
    "--calib-seqlen": dict(type=_positive_int, default=256),
    "--seed": dict(type=int, default=42),
    "--mlp-method": dict(choices=("prune", "lsq", "dot"), default=None,
                         help="how the removed MLP neurons are handled: prune (dropped), lsq (ridge least-squares "
                              "correction of the down projection; the default, measured best), dot (transport-plan "
                              "merge)"),
    "--tasks": dict(default=None, help="comma-separated zero-shot tasks: piqa,arc_easy,arc_challenge,winogrande,"
                                       "boolq,lambada,copa,openbookqa,siqa (local data) or any lm-eval task name "
                                       "where the network is reachable"),
    "--limit": dict(type=_positive_int, default=None, help="first N examples of every task"),
    "--ctx": dict(type=_positive_int, default=256, help="perplexity window length in tokens (default 256)"),
    "--max-windows": dict(type=int, default=100, help="first N perplexity windows (0 = all; default 100)"),
    "--eval-dtype": dict(choices=EVAL_DTYPE_NAMES, default="float32",
                         help="precision of the evaluations (see evaluate --dtype; default float32)"),
    "--workers": dict(type=_positive_int, default=None, help="task threads of a local run (default 2-4 by cores)"),
    "--register-name": dict(default=None, help="registered model name in MLflow (default dotresize-<model>)"),
    "--no-mlflow": dict(action="store_true", help="log nothing to MLflow"),
    "--tracking-uri": dict(default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the run's record, "
                                              "DOTRESIZE_HOME, ./runs)"),
    "--certificate-chain": dict(action="append", default=[], metavar="CA.pem",
                                help="certificate mode: intermediate/root certificates (PEM; repeatable)"),
    "--json": dict(action="store_true", help="print the result as JSON"),
}


def _shared(p, *flags: str, **help_texts: str) -> None:
    """Add the shared options ``flags`` to ``p``; ``help_texts`` (by destination: ``no_mlflow="..."``) replace
    their help."""
    for flag in flags:
        spec = dict(_SHARED[flag])
        dest = flag.lstrip("-").replace("-", "_")
        if dest in help_texts:
            spec["help"] = help_texts[dest]
        p.add_argument(flag, **spec)


def _add_console_options(p, subcommand: bool) -> None:
    """-v and -q, before the subcommand or after it (a subcommand's copy keeps the value given before it)."""
    default = {"default": argparse.SUPPRESS} if subcommand else {}
    p.add_argument("-v", "--verbose", action="store_true", **default,
                   help="debug logging; a compression also shows every task's lines (always in the run's "
                        "compress.log)")
    p.add_argument("-q", "--quiet", action="store_true", **default, help="no progress bars")


def _add_compress(p) -> None:
    """Compress the residual-stream width of a decoder LM and export a loadable model."""
    _shared(p, "--model")
    p.add_argument("--ratio", type=_ratio, required=True,
                   help="fraction of the hidden width removed, in (0, 1); 0 with --mlp-ratio reduces the MLPs only")
    p.add_argument("--method", choices=("dot", "pca", "prune"), default="dot")
    _shared(p, "--mode", "--layout", "--calib-data", "--calib-samples", "--calib-seqlen", "--seed")
    p.add_argument("--run-dir", default=None,
                   help="run directory (local path or fsspec URL; default ./runs/<model>-<method>-<key>): every "
                        "stage is checkpointed there and the same command resumes it")
    p.add_argument("--out", default=None,
                   help="also copy the compressed model directory here (must not exist or be empty; never the run "
                        "directory, the MLflow store or the source, nor inside or around them)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that is a previous dotresize export (never any other directory)")
    p.add_argument("--no-wait", action="store_true",
                   help="refuse at once, instead of waiting, when another process is computing in the run directory")
    p.add_argument("--in-memory", action="store_true",
                   help="compress in this process with the in-memory API (no Prefect, run directory or MLflow); "
                        "needs --out")
    p.add_argument("--dask-address", default=None,
                   help="run the tasks on an existing Dask scheduler (tcp://host:port) instead of local threads")
    _shared(p, "--workers")
    p.add_argument("--device", default=None, help="where Sinkhorn runs (cpu, cuda, cuda:1; default cuda if present)")
    _shared(p, "--no-mlflow", "--register-name", no_mlflow="do not log the run to MLflow nor register the model")
    p.add_argument("--slice-head", action="store_true", help="also slice the last point and the head")
    p.add_argument("--round-to", type=_positive_int, default=8, help="widths are rounded down to a multiple")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--epsilon", type=float, default=None, help="DOT entropic regularisation (normalised cost)")
    p.add_argument("--cost", choices=("l2", "l1"), default=None)
    p.add_argument("--cost-normalization", choices=("max", "median", "mean", "q90"), default=None)
    p.add_argument("--marginals", choices=("uniform", "mass"), default=None)
    p.add_argument("--targets", choices=("mean_abs", "rms"), default=None, help="DOT target / prune keep rule")
    p.add_argument("--decompression", choices=("pinv", "plan", "lsq"), default=None)
    p.add_argument("--solver", choices=("torch", "pot"), default=None)
    p.add_argument("--keep-set", default=None, help="JSON file: a list of 2L+1 index lists (targets/kept neurons)")
    p.add_argument("--outlier-tokens", type=float, default=None,
                   help="drop tokens whose norm exceeds this multiple of the batch median from the statistics")
    p.add_argument("--mlp-ratio", type=_mlp_ratio, default=0.0,
                   help="fraction of every layer's MLP intermediate neurons removed, in [0, 1) (width rounded "
                        "down to a multiple of 8; default 0: MLPs untouched)")
    _shared(p, "--mlp-method")
    p.add_argument("--mlp-keep-rule", choices=("output", "energy", "obs"), default=None,
                   help="which MLP neurons are kept: output (activation energy x down-projection column norm; "
                        "default), energy (activation energy), obs (greedy by the corrected output error)")
    p.add_argument("--mlp-keep-set", default=None, metavar="FILE",
                   help="JSON file: one list of kept intermediate-neuron indices per layer (instead of a keep "
                        "rule and --mlp-ratio; the lists' lengths are the widths)")
    p.add_argument("--mlp-ridge", type=float, default=None, metavar="RIDGE",
                   help="ridge of the lsq correction, relative to the mean kept activation energy (default 0.1)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="a recipe file (the watch's YAML format, one ratio; see recipes/): its settings, with the "
                        "options given on the command line overriding them")
    p.add_argument("--set", action="append", default=[], dest="config_set", metavar="KEY=VALUE",
                   help="any other compression setting, dotted (--set mlp.dot.epsilon=0.1); repeatable")
    p.add_argument("--ppl", action="store_true", help="print WikiText-2 perplexity before and after")
    _shared(p, "--tasks", "--limit", "--ctx", "--max-windows", "--eval-dtype",
            tasks="zero-shot tasks to evaluate the compressed model on (comma-separated, see evaluate); stored in "
                  "<run>/eval/lm_eval.json and logged to MLflow")
    p.add_argument("--signing-key", default=None, metavar="KEY",
                   help="sign the exported model (every file, lineage.json included) with this private key "
                        "(see `dotresize keygen`); verify with `dotresize verify MODEL --public-key KEY.pub`")
    p.add_argument("--export-dtype", choices=EVAL_DTYPE_NAMES, default=None,
                   help="dtype of the exported weights (default: the source's dtype at rest; float32 for a "
                        "quantised GGUF)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the source model's own code")
    _shared(p, "--json")


def _add_evaluate(p) -> None:
    """WikiText-2 test perplexity and zero-shot accuracy (lm-eval, offline tasks)."""
    p.add_argument("model", help="a compressed model directory, or any --model source of compress")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 test perplexity (the default when no metric)")
    _shared(p, "--ctx", "--max-windows", "--tasks", "--limit")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--dtype", choices=EVAL_DTYPE_NAMES, default="float32",
                   help="precision of the evaluated model; the log-softmax is always float32 (default float32; "
                        "bfloat16 is about 2x faster on CPUs with AVX512-BF16)")
    p.add_argument("--float32-head", action="store_true",
                   help="with --dtype bfloat16/float16: compute the output head in float32 (unrounded logits)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data directory holding wikitext-2/ and tasks/ (the calibration data setting, "
                        "$DOTRESIZE_DATA_DIR; default ../shared/data)")
    p.add_argument("--mlflow-run", default=None, metavar="RUN_ID",
                   help="log the metrics to this MLflow run (default: for a run directory, the run in its "
                        "mlflow.json)")
    _shared(p, "--no-mlflow", "--json")


def _add_bench(p) -> None:
    """Parameters, file size, batched-forward tokens/s and per-token generation latency (KV cache), compressed vs
    original in one process, as ratios."""
    p.add_argument("model", help="a compressed model directory")
    p.add_argument("--baseline", default=None, help="source model (default: the one recorded in source.json)")
    for flag, default in (("--batch", 8), ("--ctx", 256), ("--prompt", 64), ("--new-tokens", 32), ("--repeats", 5)):
        p.add_argument(flag, type=_positive_int, default=default)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all)")
    _shared(p, "--json")


def _add_sweep(p) -> None:
    """Compress and evaluate a grid of methods x ratios; completed cells are reused."""
    _shared(p, "--model")
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--methods", default="dot,pca,prune")
    p.add_argument("--mlp-ratios", default="0",
                   help="the MLP axis: every cell at each of these MLP ratios (0: MLPs untouched; with ratio 0 in "
                        "--ratios, the MLPs alone); the report adds perplexity against parameters and its Pareto front")
    _shared(p, "--mlp-method", "--mode", "--layout", "--tasks", "--limit", "--eval-dtype", "--calib-data",
            "--calib-samples", "--calib-seqlen", "--seed", "--ctx", "--max-windows",
            tasks="zero-shot tasks to evaluate per cell (comma-separated, see evaluate)")
    p.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")
    p.add_argument("--speed-batch", type=_positive_int, default=8, help="batch of the timed forward (default 8)")
    p.add_argument("--speed-ctx", type=_positive_int, default=None, help="context of the timed forward (default --ctx)")
    p.add_argument("--speed-repeats", type=_positive_int, default=3)
    _shared(p, "--workers", "--no-mlflow", workers="task threads of each local run")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<model>); each cell is a "
                                               "pipeline run under <out>/runs/, completed work is reused")
    _shared(p, "--json")


def _add_watch(p) -> None:
    """Find the checkpoints of SOURCE not yet compressed with the recipe (identity: content digest + recipe hash,
    looked up in MLflow), compress, evaluate and register each exactly once. Scheduled by `dotresize serve` /
    prefect deploy."""
    p.add_argument("source", help="a directory of checkpoint folders / .gguf files, one checkpoint, or hub "
                                  "revisions (hub:org/name@rev1,rev2)")
    p.add_argument("--recipe", required=True, help="recipe YAML file (see recipes/dot-20.yaml)")
    p.add_argument("--runs-dir", default=None,
                   help="where run directories go (default $DOTRESIZE_HOME/runs or ./runs; MLflow beside it)")
    p.add_argument("--pattern", default="*", metavar="GLOB",
                   help="only checkpoints whose name matches (default *; names inside SOURCE only, no '/')")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="also compress checkpoints that are (or hold) symbolic links leading outside SOURCE "
                        "(refused by default)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds a checkpoint's files must stay unchanged to count as written (default 5)")
    p.add_argument("--marker", default=None, help="a file a checkpoint must hold to be complete (trainer_state.json)")
    _shared(p, "--register-name", register_name="registered model name (default: recipe's, or source's)")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="wait for another watch run compressing the same checkpoint instead of leaving it to it")
    _shared(p, "--workers", "--json")


def _add_serve(p) -> None:
    """Serve the deployments (schedules included) with Prefect's serve; they show up in `prefect deployment ls` and
    run on `prefect deployment run`."""
    p.add_argument("--file", default=None, help="prefect.yaml to read (default: the packaged deployments/prefect.yaml)")
    p.add_argument("--name", action="append", default=None, help="serve only this deployment (repeatable)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of every deployment that takes it (value parsed as JSON if it can be)")
    p.add_argument("--no-schedule", action="store_true", help="serve without the schedules (manual runs only)")
    p.add_argument("--limit", type=_positive_int, default=None, help="at most this many runs at once")


def _add_lineage(p) -> None:
    """Source digests, calibration digest, recipe and hash, code version, stage digests, evaluation results and the
    artifact's files."""
    p.add_argument("target", help=_TARGET_HELP)
    _shared(p, "--tracking-uri", "--json")


def _add_verify(p) -> None:
    """Exit 0 when every file matches its signature (with --public-key), lineage.json and, where a record is found,
    MLflow; else name the file and both digests and exit 1. Works on any copy, offline: MLflow is an extra witness,
    not a need."""
    p.add_argument("target", help=_TARGET_HELP)
    p.add_argument("--public-key", default=None, metavar="KEY.pub",
                   help="check model.sig (signature over every file, lineage.json included) against this PEM "
                        "public key; a missing signature or one by another key fails")
    _shared(p, "--certificate-chain", "--tracking-uri",
            certificate_chain="check model.sig as signed in certificate mode, trusting these PEM certificates "
                              "(repeatable)")
    p.add_argument("--require-mlflow", action="store_true",
                   help="fail when no MLflow record of the model is found (default: checked where found)")
    _shared(p, "--no-mlflow", no_mlflow="do not look for an MLflow record at all")
    p.add_argument("--no-source", action="store_true", help="do not re-hash the source checkpoint")
    _shared(p, "--json")


def _add_sign(p) -> None:
    """Write MODEL_DIR/model.sig: an OpenSSF model signing bundle over the sha256 of every file of the directory.
    Check it with `dotresize verify DIR --public-key KEY.pub`. An encrypted key's password is read from
    $DOTRESIZE_SIGNING_KEY_PASSWORD."""
    p.add_argument("model_dir", help="a compressed model directory (or its run directory)")
    p.add_argument("--private-key", required=True, metavar="KEY",
                   help="PEM elliptic-curve private key (dotresize keygen, or openssl ecparam -genkey)")
    p.add_argument("--certificate", default=None, metavar="CERT.pem",
                   help="certificate mode: the key's signing certificate (PEM)")
    _shared(p, "--certificate-chain", "--json",
            certificate_chain="certificate mode: intermediate/root certificates to embed (repeatable)")


def _add_keygen(p) -> None:
    """Write a new elliptic-curve private key KEY (PEM, mode 0600; encrypted with $DOTRESIZE_SIGNING_KEY_PASSWORD
    when set) and its public key KEY.pub. Existing files are never replaced."""
    p.add_argument("key", help="path of the private key to create")
    p.add_argument("--public", default=None, help="path of the public key (default KEY.pub)")
    p.add_argument("--curve", choices=("P-256", "P-384", "P-521"), default="P-256")
    _shared(p, "--json")


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error as one line that names the help to read (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"dotresize: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # found by the top parser: name the subcommand's help, not the top one's
            command = getattr(parsed, "command", None)
            where = f"{self.prog} {command}" if command else self.prog
            self.exit(2, f"dotresize: error: unrecognized arguments: {' '.join(extras)} (see `{where} --help`)\n")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dotresize", description=__doc__.splitlines()[0])
    _add_console_options(parser, subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True)
    # name, the function adding its options (its docstring is the description), the command, its one-line help
    for name, add_options, command, help_text in (
        ("compress", _add_compress, cmd_compress, "compress a model's width and export it"),
        ("evaluate", _add_evaluate, cmd_evaluate, "evaluate a compressed (or original) model"),
        ("bench", _add_bench, cmd_bench, "measure speed of a compressed model against its source"),
        ("sweep", _add_sweep, cmd_sweep, "compress and evaluate methods x ratios, write a report with plots"),
        ("watch", _add_watch, cmd_watch, "compress every new checkpoint of a training run with a recipe (one tick)"),
        ("serve", _add_serve, cmd_serve, "serve the Prefect deployments of deployments/prefect.yaml from this machine"),
        ("lineage", _add_lineage, cmd_lineage, "show the chain from the source checkpoint to a compressed model"),
        ("verify", _add_verify, cmd_verify, "recompute every digest of a compressed model and check its records"),
        ("sign", _add_sign, cmd_sign, "sign every file of a compressed model directory (lineage.json included)"),
        ("keygen", _add_keygen, cmd_keygen, "make a key pair for signing compressed models"),
    ):
        p = sub.add_parser(name, help=help_text, description=add_options.__doc__)
        add_options(p)
        _add_console_options(p, subcommand=True)
        p.set_defaults(func=command)
    return parser


# ----------------------------------------------------------------------------------------------------------------
def _check_mlp_args(args) -> None:
    """The MLP axis' options against the others, before any work (one line each)."""
    keep_set = getattr(args, "mlp_keep_set", None)
    if keep_set is not None and args.mlp_ratio:
        raise UsageError("--mlp-keep-set fixes every layer's MLP width: drop --mlp-ratio")
    if keep_set is not None and args.mlp_keep_rule is not None:
        raise UsageError("--mlp-keep-set names the kept MLP neurons: drop --mlp-keep-rule")
    mlp_axis = bool(args.mlp_ratio) or keep_set is not None
    if args.ratio == 0 and not mlp_axis:
        raise UsageError("--ratio 0 compresses nothing: give a ratio in (0, 1), or reduce the MLPs only with "
                         "--ratio 0 --mlp-ratio R")
    if args.mlp_method is not None and not mlp_axis:
        raise UsageError("--mlp-method needs --mlp-ratio R (the fraction of MLP neurons removed)")
    for name in ("mlp_keep_rule", "mlp_ridge"):
        if getattr(args, name) is not None and not mlp_axis:
            raise UsageError(f"--{name.replace('_', '-')} needs --mlp-ratio R (the fraction of MLP neurons removed)")


def _mlp_keep_sets(path_text: str | None) -> tuple[tuple[int, ...], ...] | None:
    """--mlp-keep-set FILE: a JSON list with one list of neuron indices per layer (checked again against the model
    before any work)."""
    if path_text is None:
        return None
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--mlp-keep-set {path} does not exist: pass a JSON file with one index list per layer")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--mlp-keep-set {path} is not JSON ({str(error).splitlines()[0]}): write a list with "
                         "one index list per layer, e.g. [[0, 2, 5], [1, 3, 4]]") from None
    if (not isinstance(data, list) or not data
            or not all(isinstance(kept, list) and all(type(i) is int for i in kept) for kept in data)):
        raise UsageError(f"--mlp-keep-set {path} must hold a list with one list of integer neuron indices per "
                         "layer, e.g. [[0, 2, 5], [1, 3, 4]]")
    return tuple(tuple(kept) for kept in data)


def _mlp_choice(config) -> str:
    """How the MLP widths were chosen, for the summary line."""
    if config.mlp_keep_sets is not None:
        return "keep-set file"
    return "width schedule" if config.mlp_widths is not None else f"ratio {config.mlp_ratio}"


def _compression_config(args):
    from dotresize import CompressionConfig, DotOptions, MlpOptions

    dot_changes = {k: v for k, v in {
        "epsilon": args.epsilon, "cost": args.cost, "cost_normalization": args.cost_normalization,
        "marginals": args.marginals, "targets": args.targets, "decompression": args.decompression,
        "solver": args.solver}.items() if v is not None}
    keep_sets = None
    if args.keep_set:
        path = Path(args.keep_set)
        if not path.is_file():
            raise UsageError(f"--keep-set {path} does not exist: pass a JSON file with one index list per point")
        keep_sets = tuple(tuple(int(i) for i in s) for s in json.loads(path.read_text()))
    config = CompressionConfig(
        method=args.method, ratio=args.ratio, mode=args.mode, layout=args.layout, round_to=args.round_to,
        slice_head=args.slice_head, seed=args.seed, batch_size=args.batch_size, keep_sets=keep_sets,
        outlier_tokens=args.outlier_tokens, dot=DotOptions(**dot_changes), mlp_ratio=args.mlp_ratio,
        mlp_keep_sets=_mlp_keep_sets(getattr(args, "mlp_keep_set", None)),
        mlp=MlpOptions(**{k: v for k, v in {"method": args.mlp_method, "keep_rule": args.mlp_keep_rule,
                                            "ridge": args.mlp_ridge}.items() if v is not None}),
    )
    if not args.config_set:
        return config.validate()
    from .options_file import apply_settings

    data = config.to_dict()
    data.pop("version")
    try:
        return CompressionConfig.from_dict(apply_settings(data, args.config_set)).validate()
    except (ValueError, TypeError) as error:  # InvalidConfigError is a ValueError
        raise UsageError(str(error).splitlines()[0]) from None


def _eval_ppl(model, tokenizer, args, progress: bool) -> dict:
    from dotresize.evaluation.perplexity import wikitext2_perplexity

    return wikitext2_perplexity(model, tokenizer, ctx=args.ctx, max_windows=args.max_windows, progress=progress)


def cmd_compress(args) -> dict:
    _check_mlp_args(args)
    if args.in_memory and not args.out:
        raise UsageError("--in-memory writes only --out: pass --out DIR")
    if args.in_memory and args.eval_dtype != "float32":
        raise UsageError("--eval-dtype applies to the pipeline's evaluate stage: drop --in-memory, or evaluate "
                         "the --out directory with `dotresize evaluate DIR --dtype ...`")
    from . import preflight

    config = _compression_config(args)  # the settings alone (one line each)
    from . import runlock
    from .local_server import launched_early

    # the pipeline's local Prefect server starts while the inputs are checked
    with contextlib.nullcontext() if args.in_memory else launched_early():
        # every input checked before any work (one line each, nothing created): flows/preflight.py
        out = preflight.check_compress(args, config).paths.out
        runlock.configure(wait=not args.no_wait)
        return (_compress_in_memory if args.in_memory else _compress_pipeline)(args, config, out)


def _signing_key(args) -> str | None:
    """The private key of ``--signing-key``, checked (an unreadable or wrong key is one line before any work)."""
    if not args.signing_key:
        return None
    from storage.signing import check_signing_key

    return str(check_signing_key(args.signing_key))


def _compress_pipeline(args, config, out: Path | None) -> dict:
    """The orchestrated run (Prefect flow, checkpointed stages, MLflow); --out gets a copy of the model."""
    from dotresize.sources import resolve_source

    from dotresize.adapters import adapter_class_for_config
    from dotresize.sources import load_config

    # a missing path, an offline hub id or an unsupported architecture fails here, before Prefect starts
    adapter_class_for_config(load_config(resolve_source(args.model), args.trust_remote_code))
    signing_key = _signing_key(args)
    from .compress import run_compress
    from .logs import compression_console

    overrides = {k: v for k, v in config.to_dict().items()
                 if k not in ("method", "ratio", "mode", "layout", "seed", "version")}
    with compression_console(verbose=args.verbose, mlflow=not args.no_mlflow):
        result = _run_pipeline(run_compress, args, config, overrides, signing_key, out)
    if not args.json:
        _print_summary(args, config, result)
    return result


def _run_pipeline(run_compress, args, config, overrides: dict, signing_key: str | None, out: Path | None) -> dict:
    return run_compress(
        model=args.model, ratio=config.ratio, method=config.method, mode=config.mode, layout=config.layout,
        calib_data=args.calib_data, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        seed=config.seed, run_dir=args.run_dir, config_overrides=overrides, dask_address=args.dask_address,
        n_workers=args.workers, mlflow=not args.no_mlflow, register_name=args.register_name,
        progress=not args.quiet, ppl=args.ppl, ppl_source=args.ppl, ppl_ctx=args.ctx,
        ppl_max_windows=args.max_windows, device=args.device, trust_remote_code=args.trust_remote_code,
        tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()] or None, limit=args.limit,
        eval_dtype=args.eval_dtype, export_dtype=args.export_dtype, signing_key=signing_key,
        out=str(out) if out is not None else None, overwrite=args.overwrite)


def _print_summary(args, config, result: dict) -> None:
    """The pipeline's result in a few lines (stdout)."""
    stages = result["stages"]
    reused = sum(len(v["reused"]) for v in stages.values())
    computed = sum(len(v["computed"]) for v in stages.values())
    print(f"compressed {args.model or 'smollm2-135m-instruct'} with {config.method} ({config.mode}, "
          f"{config.layout}) at ratio {config.ratio}")
    print(f"  width {max(result['widths'])} -> {min(result['widths'])}; parameters "
          f"{result['parameters_before']:,} -> {result['parameters_after']:,} ({result['parameter_ratio']:.3f}x)")
    if result.get("mlp_widths"):
        print(f"  MLP ({config.mlp.method}, {_mlp_choice(config)}): intermediate width -> "
              f"{min(result['mlp_widths'])}" + ("" if len(set(result["mlp_widths"])) == 1
                                               else f"..{max(result['mlp_widths'])}"))
    if args.ppl:
        after = result["ppl"]
        print(f"  WikiText-2 perplexity (ctx {after['ctx']}, {after['windows']} windows): "
              f"{result['ppl_source']['ppl']:.2f} -> {after['ppl']:.2f}")
    for task, metrics in (result.get("zero_shot") or {}).get("tasks", {}).items():
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("acc", "acc_norm", "perplexity")
                          if metrics.get(k) is not None)
        print(f"  {task}: {shown} (n={metrics.get('n')})")
    print(f"  stages: {computed} computed, {reused} reused; run directory {result['run_dir']}")
    from storage.rundir import CONSOLE_LOG

    print(f"  every task's log lines: {result['run_dir'].rstrip('/')}/{CONSOLE_LOG} (-v shows them here)")
    if result.get("mlflow_run_id"):
        print(f"  MLflow run {result['mlflow_run_id']}, model {result['registered_model']} "
              f"v{result['model_version']} ({result['mlflow_tracking_uri']})")
    print(f"  model written to {result.get('out') or result['model_dir']}  (sha256 "
          f"{result['model_sha256'][:16]}, {result['seconds']:.1f} s)")


def _compress_in_memory(args, config, out: Path) -> dict:
    """``dotresize.compress`` in this process: the reference the pipeline is checked against."""
    progress = not args.quiet

    import torch

    from dotresize import compress, save_compressed
    from dotresize.adapters import adapter_class_for_config
    from dotresize.data import calibration_set
    from dotresize.sources import load_config, load_model, resolve_source
    from storage.rundir import CALIBRATION, SOURCE

    started = time.perf_counter()
    source = resolve_source(args.model)
    adapter_class_for_config(load_config(source, args.trust_remote_code))
    signing_key = _signing_key(args)
    log.info("loading %s (%s)", source.spec, source.kind)
    model, tokenizer = load_model(source, trust_remote_code=args.trust_remote_code, check_architecture=False)
    calibration = calibration_set(tokenizer, args.calib_data, samples=args.calib_samples, seqlen=args.calib_seqlen,
                                  seed=args.seed)
    log.info("calibration: %d x %d tokens of %s", *calibration.input_ids.shape, calibration.source["id"])
    result: dict = {"source": source.meta(), "calibration": calibration.meta()}
    if args.ppl:
        log.info("perplexity of the original model")
        result["ppl_source"] = _eval_ppl(model, tokenizer, args, progress)
    torch.manual_seed(args.seed)
    compressed, report = compress(model, calibration.input_ids, config, progress=progress)
    del model
    if args.export_dtype:
        compressed = compressed.to(getattr(torch, args.export_dtype))
    path = save_compressed(compressed, out, tokenizer=tokenizer, compression=config.to_dict(), overwrite=args.overwrite,
                           extra_json={"compression_report.json": report.to_dict(),
                                       SOURCE: source.meta(), CALIBRATION: calibration.meta()})
    if signing_key:
        from storage.signing import sign_model_dir

        result["signature"] = str(sign_model_dir(path, signing_key))
    result.update(out=str(path), model_dir=str(path), widths=report.widths,
                  parameters_before=report.parameters_before, parameters_after=report.parameters_after,
                  stage_seconds=report.seconds)
    if report.mlp:
        result["mlp_widths"] = report.mlp["widths"]
    if args.ppl:
        log.info("perplexity of the compressed model")
        result["ppl"] = _eval_ppl(compressed, tokenizer, args, progress)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if not args.json:
        print(f"compressed {source.spec} with {config.method} ({config.mode}, {config.layout}) at ratio {config.ratio}"
              " (in memory)")
        if report.mlp:
            print(f"  MLP ({report.mlp['method']}, {_mlp_choice(config)}): intermediate "
                  f"{report.mlp['intermediate_size']} -> {min(report.mlp['widths'])}")
        print(f"  width {report.hidden_size} -> {min(report.widths)}; parameters {report.parameters_before:,} -> "
              f"{report.parameters_after:,} ({report.parameter_ratio:.3f}x)")
        if args.ppl:
            print(f"  WikiText-2 perplexity (ctx {args.ctx}, {result['ppl']['windows']} windows): "
                  f"{result['ppl_source']['ppl']:.2f} -> {result['ppl']['ppl']:.2f}")
        print(f"  model written to {path}  ({result['seconds']} s)")
    return result


def cmd_evaluate(args) -> dict:
    from .evaluate import evaluate_command

    return evaluate_command(args, UsageError)


def cmd_bench(args) -> dict:
    import json as _json

    import torch

    from dotresize import count_parameters
    from dotresize.evaluation.speed import directory_size, forward_throughput, generation_latency
    from dotresize.sources import load_model, resolve_source
    from storage.rundir import MODEL, SOURCE

    from .evaluate import record_bench, run_dir_of

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = run_dir_of(args.model)  # a pipeline run directory: bench its model/, record into its eval/
    model_path = str(run_dir / MODEL) if run_dir is not None else args.model
    compressed_source = resolve_source(model_path)
    baseline_spec = args.baseline
    recorded = Path(model_path) / SOURCE
    if baseline_spec is None:
        if not recorded.is_file():
            raise UsageError(f"{args.model} has no source.json: pass --baseline SRC")
        baseline_spec = _json.loads(recorded.read_text())["spec"]
    baseline_source = resolve_source(baseline_spec)
    rows = {}
    for label, source in (("original", baseline_source), ("compressed", compressed_source)):
        model, _ = load_model(source, check_architecture=False)
        log.info("timing %s", label)
        rows[label] = {
            "model": source.spec,
            "parameters": count_parameters(model),
            "memory_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "file_bytes": sum(p.stat().st_size for p in source.weight_files) if source.weight_files
            else directory_size(source.directory),
            "forward": forward_throughput(model, batch=args.batch, ctx=args.ctx, repeats=args.repeats),
            "generation": generation_latency(model, prompt=args.prompt, new_tokens=args.new_tokens,
                                             repeats=max(1, args.repeats // 2)),
        }
        del model
    o, c = rows["original"], rows["compressed"]
    ratios = {
        "parameters": c["parameters"] / o["parameters"],
        "memory_bytes": c["memory_bytes"] / o["memory_bytes"],
        "file_bytes": c["file_bytes"] / o["file_bytes"],
        "tokens_per_second": c["forward"]["tokens_per_second"] / o["forward"]["tokens_per_second"],
        "seconds_per_token": c["generation"]["seconds_per_token"] / o["generation"]["seconds_per_token"],
    }
    result = {"rows": rows, "ratios": ratios, "threads": torch.get_num_threads(), "device": "cpu",
              "settings": {"batch": args.batch, "ctx": args.ctx, "prompt": args.prompt,
                           "new_tokens": args.new_tokens, "repeats": args.repeats}}
    result["mlflow"] = record_bench(model_path, result)
    if not args.json:
        print(f"| | parameters | weights in memory MB | file MB | forward tokens/s (b{args.batch}x{args.ctx}) | "
              "ms/token (generation) |")
        print("|---|---|---|---|---|---|")
        for label, r in rows.items():
            print(f"| {label} | {r['parameters']:,} | {r['memory_bytes'] / 1e6:.1f} | {r['file_bytes'] / 1e6:.1f} | "
                  f"{r['forward']['tokens_per_second']:.0f} | {1000 * r['generation']['seconds_per_token']:.2f} |")
        print(f"| ratio | {ratios['parameters']:.3f} | {ratios['memory_bytes']:.3f} | {ratios['file_bytes']:.3f} | "
              f"{ratios['tokens_per_second']:.3f} | {ratios['seconds_per_token']:.3f} |")
        print(f"(medians of {args.repeats} repeats, {torch.get_num_threads()} CPU threads, in one process; a GGUF "
              "baseline's file is quantized, so compare weights in memory rather than files)")
    return result


def cmd_sweep(args) -> dict:
    from .sweep import SweepSpec, run_sweep

    try:
        ratios = tuple(_ratio(r) for r in args.ratios.split(",") if r.strip())
    except argparse.ArgumentTypeError as error:
        raise UsageError(str(error)) from None
    try:
        mlp_ratios = tuple(_mlp_ratio(r) for r in args.mlp_ratios.split(",") if r.strip())
    except argparse.ArgumentTypeError as error:
        raise UsageError(str(error)) from None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - {"dot", "pca", "prune"}
    if unknown or not methods or not ratios:
        raise UsageError(f"--methods takes dot, pca, prune and --ratios values in (0, 1); got {args.methods!r}")
    if not mlp_ratios or (0.0 in ratios and not any(mlp_ratios)):
        raise UsageError("--ratios 0 compresses nothing without --mlp-ratios (e.g. --mlp-ratios 0.2,0.3)")
    if args.mlp_method and not any(mlp_ratios):
        raise UsageError("--mlp-method needs --mlp-ratios R,... (the fractions of MLP neurons removed)")
    spec = SweepSpec(model=args.model, ratios=ratios, methods=methods, mlp_ratios=mlp_ratios,
                     mlp_method=args.mlp_method, mode=args.mode, layout=args.layout,
                     tasks=tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip()), limit=args.limit,
                     calib_data=args.calib_data, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                     seed=args.seed, ctx=args.ctx, max_windows=args.max_windows, speed=not args.no_speed,
                     speed_batch=args.speed_batch, speed_ctx=args.speed_ctx, speed_repeats=args.speed_repeats,
                     mlflow=not args.no_mlflow, workers=args.workers, eval_dtype=args.eval_dtype)
    from .compress import slug
    from .logs import compression_console

    out = Path(args.out or f"runs/sweep-{slug(args.model or 'smollm2-135m-instruct')}")
    with compression_console(verbose=args.verbose, mlflow=not args.no_mlflow):
        result = run_sweep(spec, out, progress=not args.quiet)
    if not args.json:
        print((out / "report.md").read_text().split("![")[0])
        print(f"report and plots in {out}: {', '.join(Path(f).name for f in result['files'])}")
        if result.get("mlflow"):
            print(f"MLflow run {result['mlflow']['run_id']} ({result['mlflow']['tracking_uri']}): "
                  f"{len(result['mlflow']['metric_keys'])} metrics, the report as artifacts")
    return result


def cmd_watch(args) -> dict:
    from storage.checkpoints import check_pattern

    from .logs import install_user_error_filter
    from .watch import run_watch

    check_pattern(args.pattern)  # before Prefect starts
    install_user_error_filter()
    report = run_watch(source=args.source, recipe=args.recipe, runs_dir=args.runs_dir, pattern=args.pattern,
                       settle_seconds=args.settle, marker=args.marker, register_name=args.register_name,
                       wait_for_lock=args.wait_for_lock, n_workers=args.workers,
                       follow_symlinks=args.follow_symlinks)
    if not args.json:
        print(f"watch {args.source} with recipe {report['recipe']}: {len(report['checkpoints'])} checkpoints")
        for kind, label in (("compressed", "compressed"), ("existing", "already done"), ("busy", "busy"),
                            ("pending", "not ready"), ("refused", "refused")):
            for item in report[kind]:
                what = (f"{item['registered_model']} v{item['model_version']}" if "model_version" in item
                        else item.get("reason") or f"held by {item.get('holder')}")
                ratio = f" ratio {item['ratio']:g}" if "ratio" in item else ""
                print(f"  {label:<12} {item['checkpoint']}{ratio}: {what}")
    return report


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--param takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def cmd_serve(args) -> dict:
    from .serve import serve

    params = dict(_param(p) for p in args.param)
    serve(args.file, names=args.name, parameters=params, schedules=not args.no_schedule, limit=args.limit)
    return {}


def cmd_lineage(args) -> dict:
    from .audit import lineage_json, render_lineage, resolve_target

    target = resolve_target(args.target, tracking_uri=args.tracking_uri)
    try:
        if not args.json:
            print(render_lineage(target))
        return lineage_json(target)
    finally:
        target.close()


def cmd_verify(args) -> dict:
    import os

    from .audit import render_report, resolve_target, verify_error, verify_target

    if args.require_mlflow and args.no_mlflow:
        raise UsageError("--require-mlflow and --no-mlflow contradict each other: pass one")
    if args.public_key and args.certificate_chain:
        raise UsageError("pass --public-key or --certificate-chain, not both")
    if not args.require_mlflow:  # an extra witness: an unreachable tracking server is not worth minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    target = resolve_target(args.target, tracking_uri=args.tracking_uri, use_mlflow=not args.no_mlflow)
    try:
        report = verify_target(target, require_mlflow=args.require_mlflow, check_source=not args.no_source,
                               public_key=args.public_key, certificate_chain=args.certificate_chain)
        result = {"target": args.target, "ok": report.ok, "lineage_sha256": target.lineage_sha256,
                  "signature": report.signature,
                  "checks": [{"ok": ok, "check": text} for ok, text in report.checks],
                  "mismatches": [vars(m) for m in report.mismatches]}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(render_report(report))
        if not report.ok:
            raise verify_error(report)
        args.json = False  # printed already
        return result
    finally:
        target.close()


def cmd_sign(args) -> dict:
    from storage.signing import signature_info, sign_model_dir

    if args.certificate_chain and not args.certificate:
        raise UsageError("--certificate-chain goes with --certificate (certificate mode)")
    path = sign_model_dir(args.model_dir, args.private_key, certificate=args.certificate,
                          certificate_chain=args.certificate_chain)
    info = signature_info(path.parent) or {}
    result = {"signature": str(path), **{k: v for k, v in info.items() if k != "file"}}
    if not args.json:
        who = f"key {info.get('key_fingerprint')}" if info.get("key_fingerprint") else info.get("certificate_subject")
        print(f"signed {info.get('files')} files of {path.parent} (lineage.json included) with {who}")
        print(f"  signature {path}; check it with: dotresize verify {path.parent} --public-key KEY.pub")
    return result


def cmd_keygen(args) -> dict:
    from storage.signing import generate_key

    private, public, fingerprint = generate_key(args.key, args.public, curve=args.curve)
    if not args.json:
        print(f"private key {private} (keep it secret: mode 0600)")
        print(f"public key  {public} (fingerprint {fingerprint}; give it to whoever verifies)")
    return {"private_key": str(private), "public_key": str(public), "fingerprint": fingerprint}


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The command line. As the program itself (``argv`` None) it also owns the process's signals: Ctrl-C and
    SIGTERM print one line, stop every child process and exit 130/143 within seconds (:mod:`flows.interrupts`)."""
    apply_offline_defaults()
    parser = build_parser()
    from .options_file import RecipeFileError, expand_recipe

    as_program = argv is None
    try:  # compress --recipe FILE: the file's options, then the command line's (which win)
        argv = expand_recipe(list(sys.argv[1:] if as_program else argv))
    except RecipeFileError as error:
        parser.exit(2, f"dotresize: error: {error} (see `dotresize compress --help`)\n")
    args = parser.parse_args(argv)
    if not as_program:  # called from Python (tests, notebooks): the caller's signal handling and allocator stay
        return _main(parser, args)
    from .allocator import tune_allocator
    from .interrupts import guard

    tune_allocator()  # before any thread starts (see flows/allocator.py)

    # compress: signals blocked in every thread, taken by a watcher (its one child, the local Prefect server, is
    # started with the default mask). Other commands start children that must keep the default mask (serve's flow
    # runs, which Prefect cancels with SIGTERM; Prefect's own ephemeral server): plain handlers there.
    serving = args.func is cmd_serve
    with guard(block=args.func is cmd_compress,
               what_next="the deployments are no longer served" if serving else None):
        return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args) -> int:
    from .logs import configure_cli_logging

    # a compression's console: one line per stage, the tasks' lines in the run's log file (all of it with -v)
    configure_cli_logging(logging.DEBUG if args.verbose else logging.INFO,
                          runs_to_file=args.func in (cmd_compress, cmd_sweep) and not args.verbose)
    for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        result = args.func(args)
    except UsageError as error:
        parser.exit(2, f"dotresize: error: {error} (see `dotresize {args.command} --help`)\n")
    except KeyboardInterrupt:
        print("dotresize: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = _user_error_message(error)
        if message is None:
            raise
        print(f"dotresize: error: {message}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


def _user_error_message(error: Exception) -> str | None:
    """The one line of an error that is the user's to fix; None for a bug (its traceback is shown).

    A :class:`dotresize.DotResizeError` or a failed preflight check says itself what to change. An OSError of a
    full disk, a read-only filesystem or a refused permission -- found however late -- is named with its path.
    """
    import errno

    from .logs import is_user_error
    from .preflight import PreflightError

    errors = sys.modules.get("dotresize.errors")  # loaded by then if the error is one of them
    if isinstance(error, PreflightError) or (errors is not None and isinstance(error, errors.DotResizeError)):
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not is_user_error(error):
        return None
    unknown = "a file this command writes (run directory, --out, MLflow home)"
    written = error.filename2 or error.filename or unknown  # a copy or rename names its destination second
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device holding {written}: free some space, or choose another --run-dir/--out, "
                "then run the same command again (finished stages are reused)")
    if error.errno == errno.EROFS:
        return f"{written} is on a read-only filesystem: choose a writable location (--run-dir, --out, DOTRESIZE_HOME)"
    where = " or ".join(str(f) for f in (error.filename, error.filename2) if f) or unknown
    return f"permission denied on {where}: make it writable, or choose another location (--run-dir, --out)"


if __name__ == "__main__":
    sys.exit(main())
