"""r3f-probe: measure representational collapse with the paper's three probing experiments (Sec. 5).

    r3f-probe retention --chain sst2 qnli qqp rte --cycles 3 --output-dir probes
    r3f-probe degradation --chain sst2 qnli qqp rte --output-dir probes     # reuses retention's cycle 1
    r3f-probe generalization --source sst2 --targets rte mrpc cola --output-dir probes  # and its stage 1

Each writes ``<output-dir>/<subcommand>.json`` (saved after every checkpoint), ``.md`` and ``.png``.

Every checkpoint is fine-tuned with ``r3f-finetune`` with a fresh head (kept: a rerun with the same
arguments reuses finished stages and resumes an interrupted one), its
encoder is frozen, pooled features are extracted once and cached, and a deterministic linear probe (L2
logistic regression, LBFGS, float64) is trained per probed task. Two cheap collapse measures come with
every checkpoint: linear CKA to the pretrained features on a fixed probe set, and the distance of the
encoder's weights from the pretrained ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..methods import METHODS, SETTINGS, USES
from . import finetune as ft
from .cli import HelpFormatter, loading_bars
from .data import atomic_write, collate, default_model, encode, load_examples, subset
from .glue import TASKS, GlueDataError, compute_metrics, default_data_dir, resolve

__all__ = ["main", "extract_features", "train_probe", "probe_predict", "linear_cka", "param_distance"]

COMMANDS = ("generalization", "degradation", "retention")


# -- the measures ---------------------------------------------------------------------------------
def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-2,
                max_iter: int = 200) -> dict:
    """Multinomial logistic regression on frozen features, deterministic: features standardised with the
    training mean/std, float64, zero init, full-batch LBFGS with strong-Wolfe line search, minimising
    ``mean CE(xW + b, y) + l2/2 ||W||²`` (no penalty on b). Returns the probe (for :func:`probe_predict`)."""
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"need features (n, d) and labels (n,), n > 0; got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"w": w.detach(), "b": b.detach(), "mean": mean, "std": std}


def probe_predict(probe: dict, x: torch.Tensor) -> torch.Tensor:
    return (((x.double() - probe["mean"]) / probe["std"]) @ probe["w"] + probe["b"]).argmax(-1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of two feature sets of the same n examples:
    ``||Yᶜᵀ Xᶜ||²_F / (||Xᶜᵀ Xᶜ||_F ||Yᶜᵀ Yᶜ||_F)`` with column-centred X, Y. 1 for identical features."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need (n, d1) and (n, d2) features of the same examples; got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


def _load_encoder(model_dir: str):
    """The bare encoder of a folder. A fine-tuned stage's classifier weights are dropped on purpose, so
    transformers' load report about them (two per checkpoint) is kept quiet; encoder weights missing from
    the folder (other than a pooler) are an error instead of a silently random encoder."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(model_dir, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    bad = sorted(k for k in info["missing_keys"] if "pooler" not in k) + sorted(map(str, info["mismatched_keys"]))
    if bad:
        raise SystemExit(f"r3f-probe: {model_dir} lacks (or has mis-shaped) encoder weights {bad[:4]}"
                         f"{' ...' if len(bad) > 4 else ''}; pass a checkpoint of the model being probed")
    return model


def _encoder_state(model_dir: str) -> dict:
    return _load_encoder(model_dir).state_dict()


_REFERENCE: dict = {}


def param_distance(model_dir: str, reference_dir: str) -> dict:
    """``||θ − θ₀||₂`` over the encoder's weights (the pooler excluded: all-MiniLM-L6-v2's ``pooler.dense``
    was never trained, zero bias and a random-like weight, and mean pooling does not use it), and the same
    relative to ``||θ₀||₂``."""
    key = model_digest(reference_dir)  # the reference (the pretrained model) is loaded once, not per checkpoint
    if key not in _REFERENCE:
        _REFERENCE.clear()
        _REFERENCE[key] = _encoder_state(reference_dir)
    a, b = _encoder_state(model_dir), _REFERENCE[key]
    keys = [k for k in b if k in a and a[k].shape == b[k].shape and "pooler" not in k and b[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys) ** 0.5
    ref = sum(float(b[k].double().square().sum()) for k in keys) ** 0.5
    return {"l2": diff, "relative": diff / ref, "tensors": len(keys)}


FEATURES_VERSION = 1  # bump when the feature code changes: old cache entries are then never reused
_DIGESTS: dict = {}


def model_digest(model_dir: str) -> str:
    """SHA-256 of a model folder's weights, config and tokenizer files (memoised on path, size, mtime)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model")))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise SystemExit(f"r3f-probe: {model_dir} holds no model weights (*.safetensors, *.bin); pass a folder "
                         "written by save_pretrained")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_LOADED: dict = {}


def _feature_model(model_dir: str):
    """Tokenizer and frozen encoder of a folder; the last one loaded is kept for the next call."""
    from transformers import AutoTokenizer

    key = model_digest(model_dir)
    if key not in _LOADED:
        try:
            loaded = AutoTokenizer.from_pretrained(model_dir), _load_encoder(model_dir).eval()
        except (OSError, ValueError) as e:
            raise SystemExit(f"r3f-probe: {model_dir} is not a Hugging Face model folder with a tokenizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})")
        _LOADED.clear()
        _LOADED[key] = loaded
    return _LOADED[key]


@torch.no_grad()
def extract_features(model_dir: str, texts: list, *, max_length: int = 128, batch_size: int = 128,
                     pooling: str = "mean", cache_dir: Optional[str] = None) -> torch.Tensor:
    """Pooled last-layer features (n, hidden) of the frozen encoder in ``model_dir``, float32 on CPU.
    ``pooling``: "mean" over non-padding tokens (all-MiniLM-L6-v2's own) or "cls". With ``cache_dir``,
    the result is stored under a hash of the weights, the texts and the settings, and reused."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if cache_dir is None:
        return _pooled_features(model_dir, texts, max_length, batch_size, pooling)
    from filelock import FileLock

    key = hashlib.sha256(json.dumps([FEATURES_VERSION, model_digest(model_dir), texts, max_length, pooling]).encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:32]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # one writer per entry; a second process waits, then reads it
        cached = _read_cached(path, len(texts))
        if cached is not None:
            return cached
        out = _pooled_features(model_dir, texts, max_length, batch_size, pooling)
        atomic_write(path, lambda p: torch.save(out, p))
    return out


def _read_cached(path: Path, n: int) -> Optional[torch.Tensor]:
    """A cache entry as written by :func:`extract_features`, or None (a miss) if it is absent, unreadable,
    not a tensor, or not ``n`` rows of float32 features. Loaded with ``weights_only=True``: never runs code."""
    if not path.is_file():
        return None
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    ok = isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == n and x.dtype == torch.float32
    return x if ok else None


def _pooled_features(model_dir: str, texts: list, max_length: int, batch_size: int, pooling: str) -> torch.Tensor:
    tok, model = _feature_model(model_dir)
    feats = encode(tok, texts, max_length)
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    out = torch.empty(len(feats), model.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate(tok, [feats[i] for i in idx])
        h = model(**batch).last_hidden_state.float()
        if pooling == "cls":
            pooled = h[:, 0]
        else:
            m = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        out[idx] = pooled
    return out


# -- the experiments ------------------------------------------------------------------------------
def _probe_data(args: argparse.Namespace, task: str) -> dict:
    """Probe train / eval examples of a task: a fixed subset of its train file, and its official dev set
    (QQP: the held-out slice of train, as no official dev set is available)."""
    t = TASKS[task]
    train = load_examples(resolve(f"{t.folder}/{t.train_file}", args.data_dir), task, args.probe_train_examples)
    texts, labels = load_examples(resolve(f"{t.folder}/{t.eval_file}", args.data_dir), task, None)
    idx = subset(len(labels), args.probe_eval_examples)  # the same subset as load_examples draws
    return {"train": train, "eval": ([texts[i] for i in idx], [labels[i] for i in idx]),
            "eval_file": f"{t.folder}/{t.eval_file}", "official_dev": t.eval_official and len(idx) == len(labels),
            "n_dev": len(labels)}


class Prober:
    """Probes checkpoints on a set of tasks, with features cached under ``<output-dir>/features``."""

    def __init__(self, args: argparse.Namespace, tasks: Sequence[str], source: str):
        self.args, self.pretrained = args, args.model
        self.data = {t: _probe_data(args, t) for t in dict.fromkeys(tasks)}  # bad data fails here
        cka_task = args.cka_task or source
        cka_data = self.data[cka_task] if cka_task in self.data else _probe_data(args, cka_task)  # read once
        texts = cka_data["eval"][0]
        if len(texts) < min(args.cka_examples, cka_data["n_dev"]):  # --probe-eval-examples cut the dev set
            raise SystemExit(f"r3f-probe: --cka-examples {args.cka_examples} is more than the {len(texts)} {cka_task} "
                             "dev examples --probe-eval-examples keeps, which the CKA probe set is drawn from: raise "
                             "--probe-eval-examples or lower --cka-examples")
        self.cka_texts = texts[:args.cka_examples]  # fewer only where the dev set itself is smaller
        self.cache = str(Path(args.output_dir) / "features")

    def features(self, model_dir: str, texts: list) -> torch.Tensor:
        return extract_features(model_dir, texts, max_length=self.args.max_length, pooling=self.args.pooling,
                                cache_dir=self.cache)

    def __call__(self, model_dir: str, tasks: Sequence[str]) -> dict:
        probes = {}
        for task in tasks:
            (tx, ty), (ex, ey) = self.data[task]["train"], self.data[task]["eval"]
            probe = train_probe(self.features(model_dir, tx), torch.tensor(ty), len(TASKS[task].labels),
                                l2=self.args.probe_l2)
            preds = probe_predict(probe, self.features(model_dir, ex)).tolist()
            probes[task] = compute_metrics(task, preds, ey)
        cka = linear_cka(self.features(self.pretrained, self.cka_texts), self.features(model_dir, self.cka_texts))
        return {"checkpoint": model_dir, "probes": probes, "cka_to_pretrained": cka,
                "param_distance": param_distance(model_dir, self.pretrained)}


def _read_stage(path: Path) -> Optional[dict]:
    """A stage's recorded spec, or None when it is missing, truncated or unreadable (the stage is re-run)."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(spec, dict) and isinstance(spec.get("argv"), list) and "input_digest" in spec \
        and all(flag in spec["argv"] for flag in ("--model", "--output-dir"))
    return spec if ok else None


def _same_stage(old: dict, new: dict) -> bool:
    """Same arguments and same input weights. The input is compared by its digest, not its path, so a
    moved or reinstalled copy of the pretrained model still reuses its stages."""
    def key(spec: dict) -> tuple:
        argv = list(spec["argv"])
        for flag in ("--model", "--output-dir"):  # the input is its digest; the output is where stage.json is
            i = argv.index(flag)
            argv[i + 1] = None
        return spec["input_digest"], argv
    return key(old) == key(new)


def _finetune_stage(args: argparse.Namespace, task: str, method: str, seed: int, model_dir: str, out: Path) -> str:
    """Fine-tune one stage with r3f-finetune (a fresh head, the stage's budget); returns the saved model.
    A finished stage is reused, and an interrupted one resumed, only if it was run with the same
    arguments from the same input weights (``stage.json``); otherwise it is run afresh."""
    # --lam/--eps go to the methods that read them; the others get the defaults (no warning, same stage key)
    lam, eps = ((getattr(args, k) if k in USES[method] else SETTINGS[k]) for k in ("lam", "eps"))
    argv = ["--task", task, "--method", method, "--seed", str(seed), "--model", model_dir, "--output-dir",
            str(out), "--save-model", "--reinit-head", "--max-steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--max-length", str(args.max_length), "--lam",
            str(lam), "--eps", str(eps), "--max-eval-examples", str(args.stage_eval_examples)]
    if args.data_dir:  # absolute, so the same data given by another relative path still matches
        argv += ["--data-dir", str(Path(args.data_dir).resolve())]
    if args.max_train_examples is not None:
        argv += ["--max-train-examples", str(args.max_train_examples)]
    spec = {"argv": argv, "input_digest": model_digest(model_dir)}
    spec_path = out / "stage.json"
    old = _read_stage(spec_path)
    same = old is not None and _same_stage(old, spec)
    if same and (out / "results.json").is_file() and (out / "model").is_dir():
        from tqdm.auto import tqdm

        tqdm.write(f"{out}: finished earlier with the same arguments and input: reused")
        return str(out / "model")
    resume = same and (out / "checkpoint.pt").is_file()
    if not same:  # invalidate the old stage's outputs first, then record the new spec (a crash in between
        # leaves no stale results under the new spec)
        for stale in ("results.json", "checkpoint.pt"):
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(out / "model", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(spec_path, lambda p: p.write_text(json.dumps(spec)))
    ft.main(argv + ["--resume" if resume else "--overwrite"] + (["--no-progress"] if args.no_progress else []))
    return str(out / "model")


def run_experiment(args: argparse.Namespace, on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """Run one subcommand over methods × seeds; returns what is written to ``<command>.json``.
    ``on_row(partial_result)`` is called after every probed checkpoint (``main`` saves it then, so a
    crash keeps the rows so far)."""
    from tqdm.auto import tqdm

    cmd = args.command
    if cmd == "generalization":
        stages, probed = [args.source], list(args.targets)
    else:
        stages = list(args.chain) * (args.cycles if cmd == "retention" else 1)
        probed = [args.chain[0]] if cmd == "degradation" else list(dict.fromkeys(args.chain))
    for task in dict.fromkeys(stages):  # bad stage data fails now, not hours into the experiment
        t = TASKS[task]
        for name in (t.train_file, t.eval_file):
            load_examples(resolve(f"{t.folder}/{name}", args.data_dir), task, 1)
    prober = Prober(args, probed, stages[0])
    out = Path(args.output_dir)
    rows = [{"method": "pretrained", "seed": None, "stage": 0, "cycle": 0, "after": None,
             **prober(args.model, probed)}]
    bar = tqdm(total=len(args.methods) * len(args.seeds) * len(stages), desc=f"r3f-probe {cmd}",
               disable=True if args.no_progress else None)
    bar.write(f"pretrained: {rows[0]['probes']}")
    probe_data = {t: {"n_train": len(d["train"][1]), "eval_file": d["eval_file"], "n_eval": len(d["eval"][1]),
                      "eval_is_full_official_dev": d["official_dev"]} for t, d in prober.data.items()}
    result = {"command": cmd, "arguments": dict(vars(args)), "probe_data": probe_data,
              "cka_probe_set": {"task": args.cka_task or stages[0], "n": len(prober.cka_texts)}, "rows": rows,
              "complete": False}
    for method in args.methods:
        for seed in args.seeds:
            model_dir = args.model
            for i, task in enumerate(stages):
                run_dir = out / "runs" / f"{method}-seed{seed}" / f"{i + 1:02d}-{task}"
                model_dir = _finetune_stage(args, task, method, seed, model_dir, run_dir)
                row = {"method": method, "seed": seed, "stage": i + 1,
                       "cycle": 1 if cmd == "generalization" else i // len(args.chain) + 1, "after": task,
                       **prober(model_dir, probed)}
                rows.append(row)
                if on_row is not None:
                    on_row(result)
                bar.update(1)
                bar.write(f"{method} seed={seed} after stage {i + 1} ({task}): " + ", ".join(
                    f"{t}={_primary(row, t):.4f}" for t in probed) + f", CKA={row['cka_to_pretrained']:.3f}")
    bar.close()
    result["complete"] = True
    return result


# -- reporting ------------------------------------------------------------------------------------
def _primary(row: dict, task: str) -> float:
    return row["probes"][task][TASKS[task].primary_metric]


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.median(vals):.4f} ({statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f})"


def markdown(result: dict) -> str:
    """Medians over seeds (mean ± sample std) of each probe's primary metric, CKA and weight distance."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    stages = sorted({(r["stage"], r["cycle"], r["after"]) for r in rows if r["method"] != "pretrained"})
    tasks = list(dict.fromkeys(t for r in rows for t in r["probes"]))
    lines = ["| method | stage | cycle | after | " + " | ".join(f"{t} ({TASKS[t].primary_metric})" for t in tasks)
             + " | CKA to pretrained | ‖θ−θ₀‖/‖θ₀‖ |", "|" + "---|" * (len(tasks) + 6)]
    for method in methods:
        for stage, cycle, after in ([(0, 0, None)] if method == "pretrained" else stages):
            group = [r for r in rows if r["method"] == method and r["stage"] == stage]
            if not group:
                continue
            cells = [_fmt([_primary(r, t) for r in group if t in r["probes"]]) for t in tasks]
            lines.append(f"| {method} | {stage} | {cycle} | {after or '–'} | " + " | ".join(cells) + " | "
                         + _fmt([r["cka_to_pretrained"] for r in group]) + " | "
                         + _fmt([r["param_distance"]["relative"] for r in group]) + " |")
    return "\n".join(lines) + ("\n\nValues: median over seeds (mean ± sample std; the plot shows the means); a "
                               "single seed's value where there is one seed.\n")


def plot(result: dict, path: Path) -> None:
    """Generalization: grouped bars of probe scores per target (the paper's Fig. 3). Degradation and
    retention: probe score per task along the chain, one line per method (Figs. 4–5). Last panel: CKA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, chain = result["rows"], result["command"] != "generalization"
    base = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "pretrained"))
    tasks = list(dict.fromkeys(t for r in rows for t in r["probes"]))
    stages = sorted({(r["stage"], r["after"]) for r in rows if r["method"] != "pretrained"})
    panels = [(t, lambda r, t=t: _primary(r, t), f"probe: {t} ({TASKS[t].primary_metric})") for t in tasks]
    panels.append(("cka", lambda r: r["cka_to_pretrained"], "CKA to pretrained features"))
    ncols = len(panels) if len(panels) <= 4 else -(-len(panels) // 2)  # two rows: readable at page width
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.1 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, value, title) in zip(axes.flat, panels):
        for j, method in enumerate(methods):
            group = [r for r in rows if r["method"] == method and (key == "cka" or key in r["probes"])]
            if chain:  # mean over seeds per stage, ± sample std as a band; points = single seeds
                xs = [s for s, _ in stages]
                per = [[value(r) for r in group if r["stage"] == s] for s in xs]
                mean = [statistics.fmean(v) for v in per]
                std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per]
                ax.plot(xs, mean, "-o", ms=3, color=f"C{j}", label=method)
                ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=f"C{j}", alpha=0.12, lw=0)
                ax.scatter([r["stage"] + (j - (len(methods) - 1) / 2) * 0.08 for r in group],
                           [value(r) for r in group], s=8, color=f"C{j}", alpha=0.5)
            else:
                vals = [value(r) for r in group]
                ax.bar(j, statistics.fmean(vals), width=0.7, color=f"C{j}", alpha=0.7, label=method,
                       yerr=statistics.stdev(vals) if len(vals) > 1 else None, capsize=3)
                ax.scatter([j] * len(group), vals, s=10, color="k", zorder=3)
        if key == "cka" or key in base["probes"]:
            ax.axhline(value(base), color="gray", ls="--", lw=1, label="pretrained")
        if chain:
            ax.set_xticks([s for s, _ in stages], [f"{s}\n{t}" for s, t in stages], fontsize=7)
            n = len(result["arguments"].get("chain") or [])
            for c in range(n, len(stages), n or len(stages)):
                ax.axvline(c + 0.5, color="k", lw=0.5, ls=":")
        else:
            ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"r3f-probe {result['command']}: " + ("mean over seeds per method (band ± std), points = seeds"
                                                        if chain else "bars = mean over seeds ± std, points = seeds"),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r3f-probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        s = sub.add_parser(cmd, formatter_class=HelpFormatter)
        if cmd == "generalization":
            s.add_argument("--source", required=True, choices=sorted(TASKS), help="task fine-tuned on")
            s.add_argument("--targets", nargs="+", required=True, choices=sorted(TASKS), help="tasks probed")
        else:
            s.add_argument("--chain", nargs="+", required=True, choices=sorted(TASKS),
                           help="source, then the tasks fine-tuned on in turn")
        if cmd == "retention":
            s.add_argument("--cycles", type=int, default=3, help="times the chain is repeated")
        s.add_argument("--methods", nargs="+", default=["standard", "r3f", "r4f"], choices=METHODS,
                       help="fine-tuning methods compared")
        s.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="one run per method and seed")
        s.add_argument("--output-dir", required=True, help="stages, features and the report go here (resumable)")
        s.add_argument("--data-dir", default=default_data_dir(), help="folder holding the GLUE task folders "
                       "(default: $R3F_GLUE_DIR, else $R3F_DATA_DIR/glue)")
        s.add_argument("--model", help="pretrained model folder (default: all-MiniLM-L6-v2)")
        g = s.add_argument_group("fine-tuning budget of every stage (the same for every method)")
        g.add_argument("--steps", type=int, default=200, help="optimizer steps per stage")
        g.add_argument("--batch-size", type=int, default=32, help="training examples per step")
        g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
        g.add_argument("--max-length", type=int, default=128, help="tokens per example")
        g.add_argument("--max-train-examples", type=int, help="train subset per stage")
        g.add_argument("--lam", type=float, default=1.0, help="weight of the symmetric KL term")
        g.add_argument("--eps", type=float, default=1e-5, help="noise scale")
        g.add_argument("--stage-eval-examples", type=int, default=256,
                       help="dev examples r3f-finetune evaluates each stage on (for its own results.json)")
        g = s.add_argument_group("probes")
        g.add_argument("--probe-train-examples", type=int, default=2000, help="train examples of each linear probe")
        g.add_argument("--probe-eval-examples", type=int,
                       help="dev examples of each probe (default: the whole dev set)")
        g.add_argument("--probe-l2", type=float, default=1e-2, help="L2 penalty of the probes' logistic regression")
        g.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="sentence features from the encoder")
        g.add_argument("--cka-task", choices=sorted(TASKS), help="dev set of the CKA probe set (default: the source, "
                   "or the first task of the chain)")
        g.add_argument("--cka-examples", type=int, default=500, help="examples of the CKA probe set")
        s.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' too)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``r3f-probe`` command line."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "max_length", "probe_train_examples", "probe_eval_examples", "cka_examples",
                 "cycles", "max_train_examples", "stage_eval_examples", "lr", "probe_l2"):
        value = getattr(args, name, 1)
        if value is not None and not 0 < value < math.inf:
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    for name in ("lam", "eps"):
        if not 0 <= getattr(args, name) < math.inf:
            p.error(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    for name in ("methods", "seeds"):  # a repeated one would count its rows twice in the medians
        values = getattr(args, name)
        if len(set(values)) < len(values):
            p.error(f"--{name} lists {sorted({v for v in values if values.count(v) > 1})} more than once")
    args.model = args.model or default_model("r3f-probe")
    if not Path(args.model).is_dir():
        p.error(f"--model {args.model}: no such folder; pass a local Hugging Face model folder")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        p.error(f"--output-dir {args.output_dir} is a file, not a folder; pass a folder")
    with loading_bars(not args.no_progress):  # transformers' own "Loading weights" bars too
        _run(args)


def _run(args: argparse.Namespace) -> None:
    # One file set per subcommand, so the three can share an --output-dir (and its stages and features).
    path = Path(args.output_dir) / args.command

    def save(result: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.with_suffix(".json"), lambda f: f.write_text(json.dumps(result, indent=2, default=str)))

    try:
        result = run_experiment(args, on_row=save)
    except GlueDataError as e:
        raise SystemExit(f"r3f-probe: bad data: {e}")
    save(result)
    text = markdown(result)
    atomic_write(path.with_suffix(".md"), lambda f: f.write_text(f"# r3f-probe {args.command}\n\n" + text))
    try:
        plot(result, path.with_suffix(".png"))
    except ImportError:
        print("r3f-probe: matplotlib is not installed: no plot (`pip install matplotlib`)")
    print(text + f"-> {path}.json, {path}.md, {path}.png")


if __name__ == "__main__":
    main()
