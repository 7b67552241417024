"""Conformance of `lmforge merge` with mergekit 0.1.5: the same YAML through both, every output tensor compared.

Configs (bench/merge_configs/) name models by placeholder (MODELS: tiny random llamas, and "fine-tunes" = base +
N(0, 0.02) noise, built once into a cache folder). Each is written out with folders in place of placeholders, and
that one file goes to `lmforge.merge` and to mergekit's CLI (`mergekit-yaml`'s click command, called in a loop in
ONE bench/.venv-mergekit process so its 8 s import is paid once; outputs cached by config, pool and version).

Per output tensor (names, shapes, dtypes and config.json layer counts must match too):
- exact (float32 output, deterministic method): max|lmforge - mergekit| / max|mergekit| <= 1e-6; for TIES and
  Breadcrumbs, elements whose task-vector magnitude is tied exactly at a top-k cut-off are excused.
- rounded (bfloat16/float16 output): mergekit reruns the config with `dtype: float32, out_dtype: float32`;
  lmforge must lie within one rounding (half a unit in the last place, +1%) of that. How far mergekit's own
  low-precision output strays from it is noted beside.
- invariants (dare_*, della*: random masks): elements left at the base value match the keep probabilities
  (density, or della's rank ramp density -/+ epsilon) within 5 sigma; with one task vector, the kept elements
  are it times one scale that preserves its L1 mass (mergekit's rescale) and della keeps large magnitudes more
  often; with a task vector and its negated half (`ft_anti`), each changed element is one model's contribution
  alone (sign election), never a sum. mergekit's output is put through the same checks, proving them.

    .venv/bin/python bench/merge_conformance.py                   # all configs
    .venv/bin/python bench/merge_conformance.py --cases ties,slerp
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

CONFIGS = peers.ROOT / "bench" / "merge_configs"
CACHE = Path(tempfile.gettempdir()) / f"lmforge-merge-conformance-{os.getuid()}"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "0"}
RTOL = 1e-6  # exact mode, relative to the tensor's largest magnitude
HALF_ULP = 0.505  # rounded mode, in units in the last place of the output dtype
SIGMA = 5.0  # invariants: allowed deviation of a count from its expectation

# Placeholder -> recipe. ("tiny", seed, layers, tied) | ("noise", source, seed, std) | ("anti", base, ft, factor)
# | ("scale", source, factor) | ("cast", source, dtype). Order matters: sources come first.
MODELS: dict[str, tuple] = {
    "base": ("tiny", 0, 4, False),
    "rand_a": ("tiny", 10, 4, False),
    "rand_b": ("tiny", 11, 4, False),
    "rand_c": ("tiny", 12, 4, False),
    "tied_base": ("tiny", 13, 2, True),
    "wide_base": ("tiny", 14, 1, False, 4096, 32, 8, 256),  # 16.8M-element projections: float32 sums drift
    "ft_a": ("noise", "base", 1, 0.02),
    "ft_b": ("noise", "base", 2, 0.02),
    "ft_c": ("noise", "base", 3, 0.02),
    "tied_ft": ("noise", "tied_base", 4, 0.02),
    "wide_ft": ("noise", "wide_base", 5, 0.02),
    "ft_anti": ("anti", "base", "ft_a", -0.5),
    "scaled": ("scale", "base", 1.5),
    **{f"{name}_bf16": ("cast", name, "bfloat16") for name in ("base", "ft_a", "ft_b", "ft_c")},
}
LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# mergekit's generalized task arithmetic rows: method -> (sparsification, sign consensus, normalize, rescale).
GTA = {
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}
COUNTS = {
    "unchanged": "elements left at the base value",
    "low": "kept elements, lower half of the magnitude ranks",
    "high": "kept elements, upper half of the magnitude ranks",
    "first": "elements won by ft_a (the larger scaled task vector) in the sign election",
}
PARAM_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0}

# Runs in the mergekit virtualenv: argv[1] = JSON list of {config, out}; argv[2] = where to write the errors.
MERGEKIT_DRIVER = r"""
import json, os, shutil, sys, traceback
from mergekit.scripts.run_yaml import main

errors = {}
for job in json.load(open(sys.argv[1])):
    partial = job["out"] + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        main([job["config"], partial, "--random-seed", "0", "--quiet"], standalone_mode=False)
        os.replace(partial, job["out"])
    except BaseException as error:  # a config mergekit rejects is a finding, not a crash of the batch
        errors[job["out"]] = "".join(traceback.format_exception_only(type(error), error)).strip()
json.dump(errors, open(sys.argv[2], "w"))
"""


@dataclass
class Issue:
    """One way an output differs from mergekit's (or breaks an invariant)."""

    tensor: str
    problem: str
    value: float | None = None  # max relative diff, ulps, or z-score, as `problem` says
    elements: int = 0  # elements concerned


@dataclass
class CaseReport:
    case: str
    method: str
    mode: str  # exact | rounded | invariants
    tensors: int = 0
    issues: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    worst: float = 0.0  # exact: max rel diff; rounded: max ulps; invariants: max |z|
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.issues

    def describe(self) -> str:
        head = f"{self.case} ({self.method}, {self.mode}): "
        issues = [f"  {i.tensor}: {i.problem}" + ("" if i.value is None else f" = {i.value:.3g}") for i in self.issues]
        return head + (self.error or "\n".join([f"{len(self.issues)} issue(s) in {self.tensors} tensors", *issues]))


# ---------------------------------------------------------------- inputs


def build_models(names: list[str] | None = None, cache: Path = CACHE) -> dict[str, Path]:
    """Placeholder -> folder of the models built so far, building `names` (default all) and their sources first;
    the pool is keyed by the recipes and the tiny-model factory, and each model appears whole (staged)."""
    from lmforge.models import tiny

    pool = _mkdir(cache / f"models-{_digest(json.dumps(MODELS), Path(tiny.__file__).read_text(), torch.__version__)}")
    for name in MODELS if names is None else names:
        kind, *args = MODELS[name]
        build_models([a for a in args if isinstance(a, str) and a in MODELS], cache)  # sources first
        if not (pool / name / "config.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=pool))
            _build_model(pool, staging / name, MODELS[name])
            shutil.rmtree(pool / name, ignore_errors=True)
            os.replace(staging / name, pool / name)
            staging.rmdir()
    return {name: pool / name for name in MODELS if (pool / name / "config.json").is_file()}


def placeholders(case: str) -> list[str]:
    """The models a config names."""
    text = (CONFIGS / f"{case}.yaml").read_text()
    return [name for name in MODELS if re.search(rf"\b{name}\b", text)]


def _build_model(root: Path, out: Path, recipe: tuple) -> None:
    from lmforge.models.tiny import make_tiny_llama

    kind, *args = recipe
    if kind == "tiny":
        seed, layers, tied, *wide = args  # wide: hidden, heads, kv_heads, intermediate
        shape = dict(zip(("hidden", "heads", "kv_heads", "intermediate"), wide, strict=False))
        make_tiny_llama(out, layers=layers, seed=seed, tie_embeddings=tied, **shape)
        return
    source = root / args[0]
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    if kind == "noise":
        generator = torch.Generator().manual_seed(args[1])
        tensors = {k: v + args[2] * torch.randn(v.shape, generator=generator) for k, v in sorted(tensors.items())}
    elif kind == "anti":  # base + factor * (ft - base): a task vector of the opposite sign everywhere
        ft = load_file(root / args[1] / "model.safetensors")
        tensors = {k: v + args[2] * (ft[k] - v) for k, v in tensors.items()}
    elif kind == "scale":
        tensors = {k: v * args[1] for k, v in tensors.items()}
    elif kind == "cast":
        tensors = {k: v.to(LOW_PRECISION[args[1]]) for k, v in tensors.items()}
        config["dtype"] = args[1]
    out.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", {"format": "pt"})
    for extra in source.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "config.json":
            shutil.copy(extra, out / extra.name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def materialise(case: str, models: dict[str, Path], cache: Path = CACHE, reference: bool = False) -> Path:
    """Write `case` with its placeholders replaced by model folders; `reference` = the float32 rerun."""
    data = case_data(case)

    def swap(node, key=None):  # `tokenizer_source: base` is a mergekit keyword, not the placeholder
        if isinstance(node, dict):
            return {k: swap(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        named = key in ("model", "base_model") or (key == "tokenizer_source" and node not in ("base", "union"))
        return str(models[node]) if named and isinstance(node, str) and node in models else node

    data = swap(data)
    if reference:
        data |= {"dtype": "float32", "out_dtype": "float32"}
    text = yaml.safe_dump(data, sort_keys=False)
    path = _mkdir(cache / "configs") / f"{case}{'.ref' if reference else ''}.{_digest(text)}.yaml"
    path.write_text(text)
    return path


def case_data(case: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{case}.yaml").read_text())


def out_dtype(case: str) -> str | None:
    return (data := case_data(case)).get("out_dtype") or data.get("dtype")


def mode_of(case: str) -> str:
    if GTA.get(case_data(case)["merge_method"], (None,))[0] in ("random", "della"):
        return "invariants"
    return "rounded" if out_dtype(case) in LOW_PRECISION else "exact"


# ---------------------------------------------------------------- running both tools


def mergekit_outputs(
    cases: list[str], models: dict[str, Path], python: Path, cache: Path = CACHE
) -> dict[str, tuple[Path | None, Path | None, str | None]]:
    """case -> (mergekit output, its float32 reference or None, error or None); one mergekit process for all."""
    version = peers.installed_version(python, "mergekit")
    jobs, result = [], {}
    for case in cases:
        outs = []
        for reference in (False, True) if mode_of(case) == "rounded" else (False,):
            config = materialise(case, models, cache, reference)
            out = cache / "mergekit" / f"{config.stem}.{_digest(config.read_text(), str(version))}"
            if not (out / "config.json").is_file():
                jobs.append({"config": str(config), "out": str(out)})
            outs.append(out)
        result[case] = (outs[0], outs[1] if len(outs) > 1 else None)
    errors: dict[str, str] = {}
    if jobs:
        work = Path(tempfile.mkdtemp(prefix="mergekit-jobs-", dir=_mkdir(cache / "mergekit")))
        (work / "jobs.json").write_text(json.dumps(jobs))
        command = [str(python), "-c", MERGEKIT_DRIVER, str(work / "jobs.json"), str(work / "errors.json")]
        done = subprocess.run(command, env=os.environ | OFFLINE, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"mergekit driver exited with {done.returncode}:\n{done.stderr[-3000:]}")
        errors = json.loads((work / "errors.json").read_text())
        shutil.rmtree(work, ignore_errors=True)
    failed = {path: f"mergekit failed: {text}" for path, text in errors.items()}
    return {case: (out, ref, failed.get(str(out)) or failed.get(str(ref))) for case, (out, ref) in result.items()}


def run_lmforge(case: str, models: dict[str, Path], out: Path, cache: Path = CACHE) -> str | None:
    """Merge `case` with lmforge's Python API into `out`; the error text, or None."""
    import lmforge

    try:
        lmforge.merge(materialise(case, models, cache), out, overwrite=True)
    except Exception as error:  # report, don't crash: the point is to list every difference
        return f"lmforge failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


# ---------------------------------------------------------------- comparing


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors


def compare(case: str, models: dict[str, Path], lm_dir: Path, mk_dir: Path, ref_dir: Path | None = None) -> CaseReport:
    """Every tensor of lmforge's output against mergekit's (or, for random methods, against the invariants)."""
    data = case_data(case)
    report = CaseReport(case, data["merge_method"], mode_of(case))
    ours, theirs = read_tensors(lm_dir), read_tensors(mk_dir)
    report.tensors = len(theirs)
    report.issues += [Issue(n, "missing from lmforge's output") for n in sorted(set(theirs) - set(ours))]
    report.issues += [Issue(n, "not in mergekit's output") for n in sorted(set(ours) - set(theirs))]
    both = sorted(set(ours) & set(theirs))
    layout = {n: [(tuple(t[n].shape), t[n].dtype) for t in (ours, theirs)] for n in both}
    report.issues += [Issue(n, f"shape, dtype {a} vs mergekit's {b}") for n, (a, b) in layout.items() if a != b]
    mine, peer = (json.loads((d / "config.json").read_text()) for d in (lm_dir, mk_dir))
    for key in ("num_hidden_layers", "tie_word_embeddings", "vocab_size", "hidden_size"):
        if mine.get(key) != peer.get(key):
            report.issues.append(Issue("config.json", f"{key}: {mine.get(key)} vs mergekit's {peer.get(key)}"))
    common = [n for n in both if layout[n][0][0] == layout[n][1][0]]
    inputs = {name: read_tensors(models[name]) for name in placeholders(case)}
    if report.mode == "invariants":
        check_random(report, data, {n: ours[n] for n in common}, inputs, "lmforge")
        mirror = CaseReport(case, report.method, report.mode)
        check_random(mirror, data, {n: theirs[n] for n in common}, inputs, "mergekit")
        report.notes += [f"mergekit's own output: {i.tensor}: {i.problem}" for i in mirror.issues] or [
            "mergekit's own output satisfies the same invariants"
        ]
        return report
    reference = read_tensors(ref_dir) if ref_dir else theirs
    dtype = LOW_PRECISION.get(out_dtype(case) or "") if report.mode == "rounded" else None
    own_off = excused_total = 0
    for name in common:
        excused = tie_excuses(data, name, inputs)
        excused_total += int(excused.sum()) if excused is not None else 0
        worst, bad = deviation(ours[name], reference[name], dtype, excused)
        report.worst = max(report.worst, worst)
        if bad:
            what = "max rel diff" if dtype is None else "ulps from mergekit's float32 result"
            report.issues.append(Issue(name, f"{what} ({bad} elements over the limit)", worst, bad))
        if dtype is not None:
            own_off += deviation(theirs[name], reference[name], dtype, excused)[1]
    if excused_total:
        report.notes.append(f"{excused_total} elements excused: magnitude tied exactly at a top-k cut-off")
    if report.mode == "rounded":
        total = sum(theirs[n].numel() for n in common)
        report.notes.append(f"mergekit's own {out_dtype(case)} output: {own_off}/{total} elements beyond one rounding")
    return report


def deviation(ours: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None, excused) -> tuple[float, int]:
    """(worst, elements over the limit) of |ours - target| without `excused`: relative to max |target| (limit
    RTOL) for dtype None, else in units in the last place of `dtype` at each target value (limit HALF_ULP)."""
    exact = target.double()
    if dtype is None:
        unit, limit = exact.abs().max().clamp_min(1e-30) if exact.numel() else torch.tensor(1.0), RTOL
    else:
        mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
        magnitude = exact.abs().clamp_min(torch.finfo(dtype).smallest_normal)
        unit, limit = torch.pow(2.0, torch.floor(torch.log2(magnitude)) - mantissa), HALF_ULP
    err = (ours.double() - exact).abs() / unit
    if excused is not None:
        err[excused] = 0
    if not torch.isfinite(err).all():
        return math.inf, int((~torch.isfinite(err)).sum())
    return (err.max().item() if err.numel() else 0.0), int((err > limit).sum())


# ---------------------------------------------------------------- mergekit's parameter semantics


def setting(value, tensor: str, t: float):
    """mergekit's `evaluate_setting`: scalar | gradient (interpolated at t) | [{filter, value}] (first match)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (bool, int, float, str)):
        return value
    if not value:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in value):
        scaled = t * (len(value) - 1)
        low = int(scaled)
        if any(isinstance(v, (bool, str)) for v in value):
            return value[low]
        return (1 - (scaled - low)) * value[low] + (scaled - low) * value[min(len(value) - 1, low + 1)]
    for cond in value:
        if cond.get("filter") in (None, "*") or cond["filter"] in tensor:
            return setting(cond["value"], tensor, t)
    return None


def gta_inputs(data: dict) -> tuple[str | None, list[tuple[str, dict]]]:
    """(base placeholder, [(model placeholder, its parameters)]) of a `models:` config; no slices."""
    base = data.get("base_model")
    return base, [(m["model"], m.get("parameters") or {}) for m in data.get("models", []) if m["model"] != base]


def param(data: dict, own: dict, name: str, tensor: str, t: float):
    """One model's parameter for one tensor: its own setting, then the top level, then mergekit's default."""
    for scope in (own, data.get("parameters") or {}):
        if name in scope and (value := setting(scope[name], tensor, t)) is not None:
            return value
    if name in ("normalize", "rescale"):
        return GTA[data["merge_method"]][2 if name == "normalize" else 3]
    return PARAM_DEFAULTS.get(name)


def layer_t(tensor: str, layers: int) -> float:
    """mergekit's gradient position: layer i of n at i / (n - 1); embeddings, final norm and head at 0."""
    match = re.search(r"\.layers\.(\d+)\.", tensor)
    return int(match.group(1)) / (layers - 1) if match and layers > 1 else 0.0


def tie_excuses(data: dict, tensor: str, inputs: dict[str, dict]) -> torch.Tensor | None:
    """Elements whose task-vector magnitude is tied exactly at a TIES/Breadcrumbs top-k cut-off, or None."""
    sparsify = GTA.get(data["merge_method"], (None,))[0]
    base, entries = gta_inputs(data)
    if sparsify not in ("magnitude", "outliers") or "slices" in data or base is None:
        return None
    excused = None
    t = layer_t(tensor, _layers(inputs[base]))
    for model, own in entries:
        delta = inputs[model][tensor].float() - inputs[base][tensor].float()
        magnitude = delta.abs().reshape(-1)
        n, density = magnitude.numel(), float(param(data, own, "density", tensor, t))
        if density >= 1 or n < 2:
            continue
        ordered = magnitude.sort(descending=True).values
        if sparsify == "magnitude":
            cuts = [max(1, int(density * n))]
        else:  # keep ranks [n_top, n_top + target) from the top, as magnitude_outliers does from the bottom
            target, top = int(density * n), int(float(param(data, own, "gamma", tensor, t)) * n)
            low = max(0, n - target - top)
            cuts = [n - low, n - low - target]
        tied = [ordered[c] for c in cuts if 0 < c < n and ordered[c - 1] == ordered[c] != 0]  # zeros add nothing
        for value in tied:
            mask = (delta.abs() == value).reshape(delta.shape)
            excused = mask if excused is None else excused | mask
    return excused


def _layers(tensors: dict) -> int:
    return len({int(m.group(1)) for name in tensors if (m := re.search(r"\.layers\.(\d+)\.", name))})


# ---------------------------------------------------------------- invariants of the random methods


def keep_probability(delta: torch.Tensor, method: str, density: float, epsilon: float) -> torch.Tensor:
    """Per-element keep probability: DARE's density, or DELLA's rank ramp over each row [mk sparsify.py]."""
    if density >= 1 or GTA[method][0] == "random":
        return min(density, 1.0) * (delta != 0).double()
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    ramp = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + ramp * 2 * epsilon).reshape(delta.shape) * (delta != 0)


def check_random(report: CaseReport, data: dict, out: dict, inputs: dict[str, dict], who: str) -> None:
    """Kept counts, one scale per kept task vector, L1 mass and sign election, on one tool's output."""
    method = data["merge_method"]
    base, entries = gta_inputs(data)
    if base is None or "slices" in data:
        report.notes.append("invariants need a `models:` config with a base model")
        return
    layers = _layers(inputs[base])
    election = GTA[method][1] and {m for m, _ in entries} == {"ft_a", "ft_anti"}
    totals = {key: [0.0, 0.0, 0.0] for key in COUNTS}  # observed, expected, variance
    for name, tensor in out.items():
        t = layer_t(name, layers)
        b = inputs[base][name].double()
        change = tensor.double() - b.to(tensor.dtype).double()  # against the base as the output dtype stores it
        deltas, probs, scales = [], [], []
        for model, own in entries:
            values = [param(data, own, key, name, t) for key in ("density", "epsilon", "weight", "lambda", "normalize")]
            if any(isinstance(v, (list, dict)) or v is None for v in values):
                report.notes.append(f"{name}: non-scalar parameter, invariants skipped")
                return
            density, epsilon, weight, lam, normalize = values
            delta = inputs[model][name].double() - b
            deltas.append(delta)
            probs.append(keep_probability(delta, method, float(density), float(epsilon)))
            scales.append((float(lam), float(weight), bool(normalize)))
        # One model's share of the change where it contributes alone: consensus + normalize divides its own weight
        # back out; without consensus, normalize divides by the sum of all weights.
        weights_total = sum(w for _, w, _ in scales)
        scales = [lam * (w / (w if GTA[method][1] else weights_total) if norm else w) for lam, w, norm in scales]
        _tally(totals["unchanged"], change == 0, torch.stack([1 - p for p in probs]).prod(0))
        rescale = bool(param(data, entries[0][1], "rescale", name, t))
        if len(entries) == 1:
            kept = change != 0
            if s_one := _one_scale(report, name, change, deltas[0] * scales[0], kept, who):
                _l1_mass(report, name, s_one, deltas[0], kept, who, rescale)
            ramp = probs[0] > float(param(data, entries[0][1], "density", name, t))
            for half, mask in (("low", ~ramp), ("high", ramp)):
                _tally(totals[half], kept[mask], probs[0][mask])
        if election:
            first = (change != 0) & (torch.sign(change) == torch.sign(deltas[0]))
            second = (change != 0) & (torch.sign(change) == torch.sign(deltas[1]))
            s_a = _one_scale(report, name, change, deltas[0] * scales[0], first, who)
            s_b = _one_scale(report, name, change, deltas[1] * scales[1], second, who)
            # Where both are kept, the larger of w * s * |delta| wins; ft_a's kept set is then exactly `first`.
            ratio = (deltas[1].abs() / deltas[0].abs().clamp_min(1e-30)).median().item()
            weights = [param(data, own, "weight", name, t) for _, own in entries]
            a_wins = s_a is None or s_b is None or weights[0] * s_a > weights[1] * s_b * ratio
            if a_wins and s_a:
                _l1_mass(report, name, s_a, deltas[0], first, who, rescale)
            _tally(totals["first"], first, probs[0] if a_wins else probs[0] * (1 - probs[1]))
    for key, (observed, expected, variance) in totals.items():
        if variance == 0:
            continue
        z = (observed - expected) / math.sqrt(variance)
        report.worst = max(report.worst, abs(z))
        report.notes.append(f"{COUNTS[key]}: {observed:.0f} observed, {expected:.0f} expected (z = {z:+.1f})")
        if abs(z) > SIGMA:
            report.issues.append(Issue("(all tensors)", f"{COUNTS[key]}: {observed:.0f} vs {expected:.0f}; z", z))


def _tally(total: list[float], hits: torch.Tensor, probability: torch.Tensor) -> None:
    total[0] += float(hits.sum())
    total[1] += float(probability.sum())
    total[2] += float((probability * (1 - probability)).sum())


def _one_scale(report, name, change, contribution, kept, who) -> float | None:
    """On `kept`, change == s * contribution for ONE s per tensor (else an issue); returns s. The residual is
    measured against the largest contribution: output - base carries the base's rounding, large for tiny ones."""
    if int(kept.sum()) < 2:
        return None
    strong = kept & (contribution.abs() >= contribution[kept].abs().median())
    s = (change[strong] / contribution[strong]).median().item()
    spread = (change[kept] - s * contribution[kept]).abs().max().item() / (s * contribution[kept]).abs().max().item()
    if spread > 1e-5:
        report.issues.append(Issue(name, f"{who}: kept elements are not one multiple of one task vector", spread))
    return s


def _l1_mass(report, name, s, delta, kept, who, rescale) -> None:
    """mergekit's rescale: the kept elements are scaled so that their L1 mass equals the whole task vector's."""
    l1 = delta.abs().sum().item() / delta[kept].abs().sum().item() if rescale else 1.0
    if abs(s / l1 - 1) > 1e-5:
        what = f"the L1 ratio {l1:.6g}" if rescale else "1 (rescale: false)"
        report.issues.append(Issue(name, f"{who}: rescale {s:.6g} is not {what}; rel err", s / l1 - 1))


# ---------------------------------------------------------------- driver


def run(cases: list[str], python: Path, workdir: Path, cache: Path = CACHE) -> list[CaseReport]:
    """Every case through both tools; one report each."""
    models = build_models(sorted({name for case in cases for name in placeholders(case)}), cache)
    theirs = mergekit_outputs(cases, models, python, cache)
    reports = []
    for case in cases:
        mk_dir, ref_dir, error = theirs[case]
        report = CaseReport(case, case_data(case)["merge_method"], mode_of(case))
        try:
            if not (error := error or run_lmforge(case, models, workdir / case, cache)):
                report = compare(case, models, workdir / case, mk_dir, ref_dir)
        except Exception as failure:  # an unreadable output is itself a finding
            error = f"comparison failed: {type(failure).__name__}: {failure}"
        report.error = error
        reports.append(report)
    return reports


def print_reports(reports: list[CaseReport]) -> None:
    print(f"\n{'case':<28} {'method':<17} {'mode':<10} {'tensors':>7} {'worst':>10}  result\n" + "-" * 96)
    for r in reports:
        result = "ok" if r.ok else ("ERROR" if r.error else f"{len(r.issues)} issue(s)")
        print(f"{r.case:<28} {r.method:<17} {r.mode:<10} {r.tensors:>7} {r.worst:>10.3g}  {result}")
    print("".join("\n" + r.describe() + "\n" for r in reports if not r.ok))
    print(f"{sum(r.ok for r in reports)}/{len(reports)} conform (worst: max rel diff | ulps | max |z|, by mode)")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated config names (default: all in bench/merge_configs)")
    parser.add_argument("--output", type=Path, default=peers.ROOT / "bench" / "results" / "merge_conformance.json")
    parser.add_argument("--fresh", action="store_true", help="rebuild the models and rerun mergekit (clear the cache)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",") if args.cases else config_names()
    if unknown := sorted(set(cases) - set(config_names())):
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(config_names())}")
    if args.fresh:
        shutil.rmtree(CACHE, ignore_errors=True)
    torch.set_num_threads(1)
    python = peers.ensure_mergekit()
    with tempfile.TemporaryDirectory(prefix="merge-conformance-") as workdir:
        reports = run(cases, python, Path(workdir))
    print_reports(reports)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "merge_conformance", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    payload |= {"mergekit": peers.installed_version(python, "mergekit"), "machine": peers.machine()}
    payload |= {"tolerances": {"exact_rel": RTOL, "rounded_ulps": HALF_ULP, "invariant_sigma": SIGMA}}
    payload |= {"conform": sum(r.ok for r in reports), "cases": [asdict(r) | {"ok": r.ok} for r in reports]}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
