"""`lmforge merge` side by side with mergekit 0.1.5 (`mergekit-yaml`): wall time and peak RSS, and the floor.

Cases (the same YAML file goes to both tools):
- linear, slerp, ties, dare_ties on three ~135M float32 models: lmforge's `default` SmolLM2-135M-Instruct folder
  and two "fine-tunes" of it (each tensor + N(0, (0.05 std)^2) noise), written once as safetensors into the
  cache folder (`--cache`, default ~/.cache/lmforge/bench). linear: the three models, equal weights; slerp: the
  base and one fine-tune, t 0.5; ties / dare_ties: the base and two fine-tunes, density 0.5, weight 0.5.
- ties_1b: ties (same parameters) on three ~1.17B-parameter bfloat16 random llamas (hidden 2048, 16 layers, MLP
  8192, GQA 32/8 heads, SmolLM2's 49152-token vocabulary, untied head), `dtype: bfloat16`. They are generated
  shard by shard (base shard, then each variant from it), so building them never holds a whole model; ~7 GB
  of disk for the set. mergekit needs ~11 GB of RAM here: the case is skipped when memory or disk is short.
- floor: what any torch-based merge tool pays with no arithmetic, in one process of lmforge's interpreter:
  start Python, `import torch`, read every input file (64 MB `readinto`s, to no use; two reader threads, as
  `lmforge merge` reads with two workers, so the floor is not slower for reading one file at a time) and write
  one file of the output's size (zeros), then leave by `os._exit` (no interpreter teardown). Issue 14 settled the
  target's floor as this; earlier rounds' `io_floor` was `cat` + `dd` alone, `import torch` timed beside it.

Each tool runs in a process of its own (peers.measure: wall time, peak RSS of the process tree); the order of
the two tools alternates between repeats, the floor runs after them in the same repeat; each repeat's lmforge /
floor ratio is taken within that repeat (on a shared machine the disk's and CPU's speed drift between repeats),
and the target is judged on the median of those ratios over at least three cold repeats (`--repeats`, default
3). `--page-cache cold` (default): before each timed run the inputs' pages are evicted (sync, then
posix_fadvise DONTNEED on every input file, which needs no root), so both tools and the floor read their inputs
from disk, as a user merging downloaded models does. `--page-cache warm`: every input is read once
(`cat > /dev/null`) before each timed run, so all three read from memory and the floor's reads are memory
copies. Outputs go to page cache either way (no tool calls fsync). After the last repeat, the two outputs are
compared tensor by tensor (max |lmforge - mergekit| / max |mergekit|; for
dare_ties the masks are random, so only the tensor names and shapes can agree).

Targets (issue 3, floor as settled in issue 14): lmforge within 2x of the floor on every case, and peak RSS
<= 0.3x mergekit's. `--no-mergekit` times lmforge and the floor only (the first target; ties_1b then needs
~2 GB of RAM instead of mergekit's ~11 GB, and ~40 s per repeat instead of ~4 minutes).

    .venv/bin/python bench/merge_vs_mergekit.py --skip-1b                  # the four 135M cases (~5 min)
    .venv/bin/python bench/merge_vs_mergekit.py --cases ties_1b            # check `free -g` first
    .venv/bin/python bench/merge_vs_mergekit.py --cases ties_1b --no-mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import peers
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = peers.ROOT
VENV = peers.MERGEKIT_VENV
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TOOLS = ("lmforge", "mergekit")
CASES = ("linear", "slerp", "ties", "dare_ties", "ties_1b")
# The floor (see the module docstring): argv[1] = output file, argv[2] = its size in bytes, argv[3:] = inputs.
FLOOR = """import os, sys, threading, torch
def read(names):
    buffer = memoryview(bytearray(64 << 20))
    for name in names:
        with open(name, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
readers = [threading.Thread(target=read, args=(sys.argv[3 + i :: 2],)) for i in range(2)]
for reader in readers:
    reader.start()
for reader in readers:
    reader.join()
left, buffer = int(sys.argv[2]), memoryview(bytearray(64 << 20))
with open(sys.argv[1], "wb", buffering=0) as handle:
    while left > 0:
        left -= handle.write(buffer[: min(left, len(buffer))])
os._exit(0)
"""
TARGET_FLOOR, TARGET_RSS = 2.0, 0.3
NOISE = 0.05  # fine-tune stand-in: each tensor + N(0, (NOISE * its std)^2)
# ~1.17B parameters, bfloat16: 2 x 49152 x 2048 embeddings + 16 x 60.8M per layer.
BIG = {"hidden": 2048, "layers": 16, "intermediate": 8192, "heads": 32, "kv_heads": 8, "vocab": 49152}
BIG_SHARD_BYTES = 1 << 30
NEED_1B_RAM_GB, NEED_1B_DISK_GB = 14, 12  # mergekit's ~11 GB RSS + page cache headroom; inputs + two outputs


@dataclass
class Run:
    case: str
    tool: str  # lmforge | mergekit | floor
    repeat: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    load_1m_before: float


# ---------------------------------------------------------------- inputs


def small_models(cache: Path) -> list[Path]:
    """[SmolLM2-135M, fine-tune 1, fine-tune 2]: a copy of the default folder and two noisy ones, written once.

    The default folder (dequantised from a GGUF) has no `architectures` in config.json and keeps its tied
    embedding as `lm_head.weight` only; mergekit needs both the architecture name and `model.embed_tokens.weight`,
    so the copies add LlamaForCausalLM and store the tied matrix under the embedding's name.
    """
    from lmforge.models.load import resolve_model

    base = resolve_model("default")
    root = cache / f"merge-smollm2-{base.name}"
    folders = [root / name for name in ("base", "ft_1", "ft_2")]
    for seed, folder in enumerate(folders):
        if not (folder / "config.json").is_file():
            print(f"writing {folder} ...", flush=True)
            _write_variant(base, folder, seed)
    return folders


def _write_variant(base: Path, folder: Path, seed: int) -> None:
    """`base` + seeded noise (seed 0: none) with a config.json naming its architecture."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _copy_extras(base, staging)
    config = json.loads((base / "config.json").read_text())
    config.setdefault("architectures", ["LlamaForCausalLM"])
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            tensors = {}
            for index, name in enumerate(sorted(handle.keys())):  # noqa: SIM118
                tensor = handle.get_tensor(name)
                if seed:
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                    std = tensor.float().std().item() if tensor.numel() > 1 else 0.0
                    noise = torch.randn(tensor.shape, generator=generator) * NOISE * max(std, 1e-3)
                    tensor = (tensor.float() + noise).to(tensor.dtype)
                if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    name = "model.embed_tokens.weight"
                tensors[name] = tensor
        save_file(tensors, staging / shard.name, {"format": "pt"})
    os.replace(staging, folder)


def _copy_extras(source: Path, folder: Path) -> None:
    for extra in source.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and not extra.name.startswith("lmforge"):
            shutil.copy(extra, folder / extra.name)


def big_models(cache: Path, tokenizer_from: Path) -> list[Path]:
    """Three ~1.17B bfloat16 random llamas (base + two noisy copies), generated shard by shard, written once."""
    root = cache / f"merge-llama-1b-{'-'.join(str(v) for v in BIG.values())}"
    folders = [root / name for name in ("base", "ft_1", "ft_2")]
    if all((f / "model.safetensors.index.json").is_file() for f in folders):
        return folders
    print(f"generating three ~1.17B-parameter bfloat16 models in {root} (a few minutes) ...", flush=True)
    stagings = [f.with_name(f.name + ".partial") for f in folders]
    for staging in stagings:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    shards = _big_shards()
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        base = {
            name: _random(shape, key, 0.02, 1.0 if name.endswith("norm.weight") else 0.0) for key, name, shape in shard
        }
        save_file(base, stagings[0] / file, {"format": "pt"})
        for seed, staging in enumerate(stagings[1:], start=1):
            noise = {name: _random(shape, seed * 1_000_003 + key, NOISE * 0.02) for key, name, shape in shard}
            save_file(
                {n: (t.float() + noise[n]).to(torch.bfloat16) for n, t in base.items()},
                staging / file,
                {"format": "pt"},
            )
        weight_map |= {name: file for _, name, _ in shard}
        total += sum(t.numel() * 2 for t in base.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for staging, folder in zip(stagings, folders, strict=True):
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _copy_extras(tokenizer_from, staging)  # tokenizer, chat template, generation config
        _big_config().save_pretrained(staging)  # over SmolLM2's config.json
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    return folders


def _big_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=BIG["vocab"],
        hidden_size=BIG["hidden"],
        intermediate_size=BIG["intermediate"],
        num_hidden_layers=BIG["layers"],
        num_attention_heads=BIG["heads"],
        num_key_value_heads=BIG["kv_heads"],
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],  # mergekit picks its architecture by this name
    )


def _big_shards() -> list[list[tuple[int, str, tuple[int, ...]]]]:
    """(index, name, shape) of every tensor of the llama, grouped into shards of about BIG_SHARD_BYTES."""
    h, f, v = BIG["hidden"], BIG["intermediate"], BIG["vocab"]
    kv = h // BIG["heads"] * BIG["kv_heads"]
    names = [("model.embed_tokens.weight", (v, h))]
    for i in range(BIG["layers"]):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        names += [(p + f"self_attn.{x}_proj.weight", (h if x in "qo" else kv, h)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h))]
        names += [(p + "mlp.down_proj.weight", (h, f))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    shards, current, size = [], [], 0
    for index, (name, shape) in enumerate(names):
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > BIG_SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((index, name, shape))
        size += nbytes
    return shards + [current]


def _random(shape, seed: int, std: float, mean: float = 0.0) -> torch.Tensor:
    """N(mean, std^2) in bfloat16, from a generator seeded per (model, tensor)."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std + mean).to(torch.bfloat16)


def case_config(case: str, folders: list[Path]) -> dict:
    """The mergekit YAML (as a dict) of a case; both tools get the same file."""
    base, ft_1, ft_2 = (str(f) for f in folders)
    dtype = "bfloat16" if case == "ties_1b" else "float32"
    if case == "linear":
        models = [{"model": m, "parameters": {"weight": 1.0}} for m in (base, ft_1, ft_2)]
        return {"models": models, "merge_method": "linear", "dtype": dtype}
    if case == "slerp":
        return {"models": [{"model": base}, {"model": ft_1}], "merge_method": "slerp", "base_model": base,
                "parameters": {"t": 0.5}, "dtype": dtype}  # fmt: skip
    models = [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in (ft_1, ft_2)]
    method = "dare_ties" if case == "dare_ties" else "ties"
    return {"models": models, "merge_method": method, "base_model": base, "dtype": dtype}


# ---------------------------------------------------------------- measuring


def input_files(folders: list[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(folder.glob("*.safetensors"))]


def warm(files: list[Path]) -> None:
    """Read every input once, so the timed run finds them in the page cache."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def evict(files: list[Path]) -> None:
    """Drop the inputs from the page cache, so the timed run reads them from disk (DONTNEED drops clean pages)."""
    os.sync()
    for file in files:
        handle = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


def timed(case: str, tool: str, repeat: int, args, config: Path, files: list[Path], out: Path, out_bytes: int) -> Run:
    env = {**os.environ, **OFFLINE}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if tool == "lmforge":
        command = [str(args.lmforge_python), "-m", "lmforge.cli", "merge", str(config), str(out), "--overwrite"]
    elif tool == "mergekit":
        command = [str(VENV / "bin" / "mergekit-yaml"), str(config), str(out), "--random-seed", "0"]
    else:  # the floor: start Python, import torch, read every input, write one output-sized file
        command = [str(args.lmforge_python), "-c", FLOOR, str(out), str(out_bytes), *map(str, files)]
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    warm(files) if args.page_cache == "warm" else evict(files)
    load = os.getloadavg()[0]
    print(f"  [{repeat + 1}/{args.repeats}] {case:<10} {tool:<9} ...", end=" ", flush=True)
    logs = out.parent / "logs"
    wall, cpu, rss = peers.measure(command, env, logs / f"{case}-{tool}-{repeat}.log", args.timeout)
    print(f"{wall:7.1f} s wall, {cpu:7.1f} s cpu, {rss:7.0f} MB peak RSS (load before {load:.1f})", flush=True)
    return Run(case, tool, repeat, wall, cpu, rss, load)


def agreement(case: str, config: dict, ours: Path, theirs: Path) -> dict:
    """How the two outputs compare, tensor by tensor (one tensor of each model in memory at a time).

    For TIES, elements whose task-vector magnitude is tied exactly at the top-k cut-off are left out (which of
    two equal magnitudes survives is arbitrary); how many is reported.
    """
    import merge_conformance

    def index(folder: Path) -> dict[str, Path]:
        return {n: f for f in folder.glob("*.safetensors") for n in safe_open(f, framework="pt").keys()}  # noqa: SIM118

    mine, peer = index(ours), index(theirs)
    inputs = {m: index(Path(m)) for m in {e["model"] for e in config["models"]} | {config.get("base_model")} if m}
    result = {"same_names": set(mine) == set(peer), "tensors": len(peer), "shape_mismatch": 0, "max_rel_diff": 0.0}
    result |= {"worst_tensor": None, "tensors_over_1e-6": 0, "elements_over_1e-6": 0, "excused_ties": 0}
    if case == "dare_ties":
        result["note"] = "random masks: values are not comparable"
    elif config["dtype"] == "bfloat16":  # merge_conformance compares against mergekit's float32 rerun instead
        result["note"] = "mergekit computes in bfloat16 (its top-k ranks rounded deltas), lmforge in float32"
    for name in sorted(set(mine) & set(peer)):
        a, b = (safe_open(where[name], framework="pt").get_tensor(name).float() for where in (mine, peer))
        if a.shape != b.shape:
            result["shape_mismatch"] += 1
        elif case != "dare_ties":
            excused = None
            if config["merge_method"] == "ties":
                tensors = {m: {name: safe_open(f[name], framework="pt").get_tensor(name)} for m, f in inputs.items()}
                excused = merge_conformance.tie_excuses(config, name, tensors)
            diff = (a - b).abs() / (b.abs().max().item() or 1.0)
            if excused is not None:
                diff[excused] = 0
                result["excused_ties"] += int(excused.sum())
            rel = diff.max().item()
            result["tensors_over_1e-6"] += rel > 1e-6
            result["elements_over_1e-6"] += int((diff > 1e-6).sum())
            if rel > result["max_rel_diff"]:
                result |= {"max_rel_diff": rel, "worst_tensor": name}
    return result


def summarise(runs: list[Run], agreements: dict, settled: bool) -> dict:
    """Per case: medians per tool, and ratios taken within each repeat (their median judges the targets).

    `settled` (at least three cold repeats) says whether the floor target's verdict counts (issue 14).
    """
    summary = {}
    for case in dict.fromkeys(r.case for r in runs):
        by = {(r.tool, r.repeat): r for r in runs if r.case == case}
        tools = [t for t in (*TOOLS, "floor") if (t, 0) in by]
        repeats = sorted({repeat for _, repeat in by})
        fields = ("wall_s", "cpu_s", "peak_rss_mb")
        median = {
            tool: {k: statistics.median(getattr(by[tool, i], k) for i in repeats) for k in fields} for tool in tools
        }
        per_repeat = {
            "lmforge_over_floor": [by["lmforge", i].wall_s / by["floor", i].wall_s for i in repeats],
            # CPU seconds: steadier than wall on a loaded machine, where walls measure the share of the cores each got
            "cpu_lmforge_over_floor": [by["lmforge", i].cpu_s / by["floor", i].cpu_s for i in repeats],
        }
        if "mergekit" in tools:
            per_repeat["mergekit_over_floor"] = [by["mergekit", i].wall_s / by["floor", i].wall_s for i in repeats]
            per_repeat["lmforge_over_mergekit"] = [by["lmforge", i].wall_s / by["mergekit", i].wall_s for i in repeats]
            per_repeat["rss_lmforge_over_mergekit"] = [
                by["lmforge", i].peak_rss_mb / by["mergekit", i].peak_rss_mb for i in repeats
            ]
        ratios = {name: statistics.median(values) for name, values in per_repeat.items()}
        targets = {f"within {TARGET_FLOOR}x of the floor": ratios["lmforge_over_floor"] <= TARGET_FLOOR}
        if "mergekit" in tools:
            targets[f"peak RSS <= {TARGET_RSS}x mergekit's"] = ratios["rss_lmforge_over_mergekit"] <= TARGET_RSS
        loads = [by[t, i].load_1m_before for t in tools for i in repeats]
        summary[case] = {
            **median,
            "ratios": ratios,
            "per_repeat": per_repeat,
            "load_1m_before": [min(loads), max(loads)],
            "targets": targets,
            "settled": settled,
            "agreement": agreements.get(case),
        }
    return summary


def print_table(summary: dict) -> None:
    """Medians per tool; ratios are medians of the per-repeat ratios (each repeat's runs against each other)."""
    head = (
        f"{'case':<10} {'lmforge s':>10} {'mergekit s':>11} {'floor s':>8} {'lm/floor':>9} {'[repeats]':<20}"
        f" {'lm/mk':>6} {'lm RSS MB':>10} {'mk RSS MB':>10} {'RSS lm/mk':>10} {'load':>9}  targets"
    )
    print("\n" + head + "\n" + "-" * (len(head) + 12))
    for case, s in summary.items():
        r = s["ratios"]
        failed = [k for k, v in s["targets"].items() if not v]
        met = "met" if not failed else "NOT met: " + ", ".join(failed)
        met += "" if s["settled"] else " (fewer than 3 cold repeats: not a verdict)"
        peer = "mergekit" in s
        repeats = "[" + " ".join(f"{x:.2f}" for x in s["per_repeat"]["lmforge_over_floor"]) + "]"
        print(
            f"{case:<10} {s['lmforge']['wall_s']:>10.1f} {s['mergekit']['wall_s'] if peer else float('nan'):>11.1f}"
            f" {s['floor']['wall_s']:>8.2f} {r['lmforge_over_floor']:>9.2f} {repeats:<20}"
            f" {r.get('lmforge_over_mergekit', float('nan')):>6.2f} {s['lmforge']['peak_rss_mb']:>10.0f}"
            f" {s['mergekit']['peak_rss_mb'] if peer else float('nan'):>10.0f}"
            f" {r.get('rss_lmforge_over_mergekit', float('nan')):>10.2f}"
            f" {s['load_1m_before'][0]:>4.1f}-{s['load_1m_before'][1]:<4.1f}  {met}"
        )
    print(
        f"\ntargets: lmforge wall <= {TARGET_FLOOR}x the floor (python + import torch + read inputs + write output),"
        f" median of per-repeat ratios; lmforge peak RSS <= {TARGET_RSS}x mergekit's\n"
    )


# ---------------------------------------------------------------- main


def room_for_1b(cache: Path, with_mergekit: bool) -> str | None:
    """Why the 1B case cannot run now (memory or disk short), or None; lmforge alone needs ~2 GB of RAM."""
    available = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    ram_gb = available["MemAvailable"] / (1 << 20)
    disk_gb = shutil.disk_usage(cache).free / (1 << 30)
    if ram_gb < (NEED_1B_RAM_GB if with_mergekit else 4):
        return f"only {ram_gb:.1f} GB of RAM available (mergekit needs ~11 GB; {NEED_1B_RAM_GB} GB asked)"
    if disk_gb < NEED_1B_DISK_GB and not (cache / f"merge-llama-1b-{'-'.join(map(str, BIG.values()))}").is_dir():
        return f"only {disk_gb:.1f} GB free in {cache} ({NEED_1B_DISK_GB} GB needed)"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--skip-1b", action="store_true", help="leave out ties_1b")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool and case (default 3)")
    parser.add_argument("--no-mergekit", action="store_true", help="time lmforge and the floor only")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads for both tools (default: their own choice)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmforge" / "bench")
    parser.add_argument(
        "--page-cache", choices=("cold", "warm"), default="cold", help="inputs read from disk (default) or memory"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    parser.add_argument("--lmforge-python", type=Path, default=peers.main_python())
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "merge_vs_mergekit.json")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c and not (args.skip_1b and c == "ties_1b")]
    if unknown := set(args.cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    tools = ("lmforge",) if args.no_mergekit else TOOLS
    if not args.no_mergekit:
        peers.ensure_mergekit()
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / "merge-runs"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    skipped = {}
    if "ties_1b" in args.cases and (why := room_for_1b(args.cache, not args.no_mergekit)):
        print(f"skipping ties_1b: {why}")
        skipped["ties_1b"] = why
        args.cases.remove("ties_1b")
    from lmforge.models.load import resolve_model

    small = small_models(args.cache) if set(args.cases) - {"ties_1b"} else []
    big = big_models(args.cache, resolve_model("default")) if "ties_1b" in args.cases else []
    runs, agreements = [], {}
    for case in args.cases:
        folders = big if case == "ties_1b" else small
        config = case_config(case, folders)
        used = sorted({Path(m["model"]) for m in config["models"]} | {Path(config.get("base_model") or folders[0])})
        files = input_files(used)
        out_bytes = sum(f.stat().st_size for f in input_files(folders[:1]))  # output dtype = input dtype here
        config_path = work / f"{case}.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        print(f"{case}: {len(used)} input models, {sum(f.stat().st_size for f in files) / 1e9:.2f} GB read", flush=True)
        for repeat in range(args.repeats):
            order = tools if repeat % 2 == 0 else tools[::-1]
            for tool in (*order, "floor"):
                runs.append(timed(case, tool, repeat, args, config_path, files, work / f"{case}-{tool}", out_bytes))
        if not args.no_mergekit:
            agreements[case] = agreement(case, config, work / f"{case}-lmforge", work / f"{case}-mergekit")
            print(f"  outputs agree: {agreements[case]}", flush=True)
        for tool in (*TOOLS, "floor"):
            target = work / f"{case}-{tool}"
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    summary = summarise(runs, agreements, settled=args.repeats >= 3 and args.page_cache == "cold")
    print_table(summary)
    write_report(args, summary, runs, skipped)
    return 0


def write_report(args: argparse.Namespace, summary: dict, runs: list[Run], skipped: dict) -> None:
    mergekit_python = VENV / "bin" / "python"
    report = {
        "benchmark": "merge_vs_mergekit",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "cases": args.cases,
            "repeats": args.repeats,
            "mergekit": not args.no_mergekit,
            "floor": "python -c FLOOR: start, import torch, read every input (2 threads), write the output's size",
            "threads": args.threads,
            "page_cache": args.page_cache,
            "noise": NOISE,
            "big_model": BIG,
        },  # fmt: skip
        "machine": peers.machine(),
        "versions": {
            "lmforge": {
                n: peers.installed_version(args.lmforge_python, n) for n in ("lmforge", "torch", "safetensors")
            },
            "mergekit": {n: peers.installed_version(mergekit_python, n) for n in ("mergekit", "torch", "safetensors")},
        },
        "skipped": skipped,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    sys.exit(main())
