"""Property-based fuzzing of the config readers: every generated input loads or stops with one line.

Generated YAML (documents built from each schema's real dotted keys with values of every YAML type, and raw
text full of YAML's odd corners: tags, anchors, aliases, tabs, BOMs, NULs, Latin-1 bytes) is written to a
file and read as the commands read it: `lmforge.config.load` with `key=value` overrides for SFTConfig,
DistillConfig and DPOConfig, `lmforge.merge.config.read` for mergekit YAML and `load_recipe` for recipes.
Each input must give a config or a `UserError` whose message is one line naming the file, the override or a
key; any other exception is a traceback the user would see, and fails. About half the generated documents are
near-valid (a loading config with a few keys changed), so checks past the first type check get a turn.
Inputs are derandomized (a fixed seed, no example database). `pytest -s` prints the counts; on 2026-12-06 a run
tried 1360 generated configs (1200 to 1240 refused with one line, the rest loaded) in about 20 s of CPU.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmforge import config as config_io
from lmforge.distill.run import DistillConfig
from lmforge.errors import UserError
from lmforge.finetune.dpo import DPOConfig
from lmforge.finetune.sft import SFTConfig
from lmforge.merge import config as merge_config
from lmforge.merge.methods import ALL_PARAMETER_NAMES
from lmforge.recipe.kinds import KINDS
from lmforge.recipe.schema import load_recipe

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None)
TRIED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()
HUGE = "x" * 200_000  # one 200 kB line (PyYAML's pure-Python reader takes seconds per 2 MB)


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """Print how many inputs each reader was fed (shown with pytest -s)."""
    yield
    counts = ", ".join(f"{name} {n} ({REFUSED[name]} refused)" for name, n in sorted(TRIED.items()))
    print(f"\nfuzzed config readers, inputs tried: {counts}; total {sum(TRIED.values())}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_config")


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, nested sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += dotted_keys(type(default), key + ".")
    return keys


def defaults(cls: type, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default value of every leaf field of a config dataclass (required fields left out)."""
    found: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found |= defaults(type(default), f"{prefix}{f.name}.")
        elif default is not dataclasses.MISSING:
            found[f"{prefix}{f.name}"] = default
    return found


def one_in(draw, n: int) -> bool:
    return draw(st.integers(0, n - 1)) == 0


def loads_or_one_line(name: str, read, *names: str, openers: tuple[str, ...] = ()) -> None:
    """Run a reader: a result, or a one-line UserError that holds one of `names` or opens with one of `openers`;
    anything else propagates."""
    TRIED[name] += 1
    try:
        read()
    except UserError as err:
        REFUSED[name] += 1
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert any(n in message for n in names) or message.startswith(openers), message


# Values of every type YAML can hold, plus strings that mean something to these readers.
WORDS = st.sampled_from(
    ["", " ", "lora", "full", "default", "ties", "dare_ties", "linear", "slerp", "1e-4", "nan", "~", "${x}",
     "${steps.a.output}", "a\nb", "\x00", "\u2028", "é", "[", "{", "*", "model.layers.0", "/", ".", "..", "runs/x"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 8, 100]),
    st.floats(allow_nan=True, allow_infinity=True),
    WORDS,
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | WORDS, inner, max_size=4),
    max_leaves=8,
)


def nested(pairs: list[tuple[str, object]]) -> dict:
    """{'train.lr': 1} pairs as nested YAML mappings; a later key replaces a scalar in its way."""
    tree: dict = {}
    for dotted, value in pairs:
        node = tree
        *parents, last = dotted.split(".")
        for part in parents:
            node[part] = node[part] if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[last] = value
    return tree


def like(value: object) -> st.SearchStrategy:
    """Values of the same type as a field's default: mostly right, so checks past the type check get a turn."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 10**6)
    if isinstance(value, float):
        return st.floats(-2.0, 1e4, allow_nan=False) | st.sampled_from([0.0, 1e-4, 0.5, 1.0])
    if isinstance(value, str):
        return st.sampled_from([value, "", "dates", "arithmetic", "lora", "full", "cosine", "forward_kl"]) | WORDS
    if isinstance(value, (list, tuple)):
        return st.lists(WORDS, max_size=3)
    return st.none() | SCALARS


@st.composite
def near_valid_config(draw, cls: type) -> dict:
    """A config that would load (output and a task set), then a few keys set to same-typed values, now and then
    one to any value."""
    found = defaults(cls)
    pairs: list[tuple[str, object]] = [("output", "o")] + ([("data.task", "dates")] if "data.task" in found else [])
    for key in draw(st.lists(st.sampled_from(sorted(found)), max_size=4)):
        pairs.append((key, draw(VALUES if one_in(draw, 5) else like(found[key]))))
    return nested(pairs)


def documents(keys: list[str]) -> st.SearchStrategy[dict]:
    """YAML mappings whose keys are mostly the schema's own, at their nesting, some unknown or non-strings."""
    key = st.sampled_from(keys) | st.text(max_size=8) | WORDS
    doc = st.lists(st.tuples(key, VALUES), max_size=8).map(nested)
    odd_keys = st.dictionaries(st.none() | st.integers() | st.booleans() | st.floats(), VALUES, max_size=2)
    return st.one_of(doc, st.builds(lambda d, o: {**d, **o}, doc, odd_keys))


def as_yaml(data: object) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


YAML_PIECES = st.sampled_from(
    ["\n", "  ", "\t", ": ", "- ", "{", "}", "[", "]", ", ", "'", '"', "# c", "&a ", "*a", "&a [*a]", "<<: *a\n",
     "? ", "---\n", "...\n", "%YAML 1.2\n", "!!binary aGk=", "!!set {a}", "!!python/object:os.system", "!!str ",
     "!!float", "!!int x", "!!bool x", "!!timestamp x", "!!map [1]", "!custom ", "2001-12-14",
     "2001-12-14 21:59:43.10 -5", ".nan", ".inf", "1e400",
     "0x1F", "0o17", "1_000", "~", "null", "yes", "\x00", "\ufeff", "\u2028", "\x85", "\\u00e9", "\U0001f600",
     "train:", "lr:", "lora:", "r: ", "output: o", "merge_method: ties", "models:", "- model: m", "parameters:",
     "weight: ", "density: [0.5, 1]", "steps:", "- name: a", "kind: merge", "config:", "slices:", "sources:",
     "layer_range: [0, 2]", "filter: mlp", "value: "]
)  # fmt: skip
RAW_TEXT = st.lists(YAML_PIECES | st.text(max_size=4), max_size=30).map("".join)
ENCODED = st.builds(
    lambda text, codec: text.encode(codec, errors="replace"),
    RAW_TEXT,
    st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]),
)
RAW = st.one_of(RAW_TEXT.map(str.encode), ENCODED, st.binary(max_size=64))


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def override_text(keys: list[str]) -> st.SearchStrategy[str]:
    """`key=value` strings as a shell would pass them: known or odd keys, YAML flow values or raw text."""
    key = st.sampled_from(keys) | st.text(max_size=6) | st.sampled_from(["", ".", "a..b", "train.", ".lr", "x=y"])
    value = VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()) | RAW_TEXT
    return st.builds(lambda k, v, sep: f"{k}{sep}{v}", key, value, st.sampled_from(["=", "=", "=", ""]))


COMMANDS = [SFTConfig, DistillConfig, DPOConfig]


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda cls: cls.__name__)
def test_command_configs_load_or_stop_in_one_line(workdir, cls):
    keys = dotted_keys(cls)

    @FUZZ
    @given(
        doc=near_valid_config(cls) | documents(keys), overrides=st.just([]) | st.lists(override_text(keys), max_size=2)
    )
    @example(doc={"output": HUGE}, overrides=[])
    @example(doc={"train": {"lr": HUGE}}, overrides=[f"lora.r={HUGE}"])
    @example(doc={}, overrides=["lora.target_modules=&a [*a]"])
    def check(doc, overrides):
        path = write(workdir, f"{cls.__name__}.yaml", as_yaml(doc))
        # the file, an override, or a key: quoted, dotted, or opening the message (a __post_init__ check)
        mentions = [str(path), "override", *(f"'{k}'" for k in keys), *(k for k in keys if "." in k)]
        openers = tuple(f"{k} " for k in keys)
        loads_or_one_line(cls.__name__, lambda: config_io.load(path, cls, overrides), *mentions, openers=openers)

    check()


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda cls: cls.__name__)
def test_command_configs_from_raw_bytes(workdir, cls):
    @FUZZ
    @given(raw=RAW)
    @example(raw=b"\xef\xbb\xbfoutput: o\n")
    @example(raw="output: caf\xe9\n".encode("latin-1"))
    @example(raw=b"output: o\x00\n")
    @example(raw=b"a: &a [*a]\noutput: *a\n")
    @example(raw=b"train: {lr: !!float '', max_steps: !!int x}\n")
    @example(raw=b"train: !!set [1]\n")
    @example(raw=b"train: {seed: !!timestamp x}\n")
    def check(raw):
        path = write(workdir, f"{cls.__name__}.raw.yaml", raw)
        loads_or_one_line(f"{cls.__name__} raw", lambda: config_io.load(path, cls, ["output=o"]), str(path))

    check()


MERGE_KEYS = [
    "merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "tokenizer.source", "chat_template", "modules",
]  # fmt: skip
PARAM_NAMES = st.sampled_from(sorted(ALL_PARAMETER_NAMES)) | st.text(max_size=6)
PARAMETERS = st.dictionaries(
    PARAM_NAMES,
    VALUES | st.lists(st.fixed_dictionaries({"value": VALUES}, optional={"filter": VALUES}), max_size=3),
    max_size=3,
)
SOURCE = st.one_of(
    WORDS,
    st.fixed_dictionaries(
        {"model": WORDS | VALUES}, optional={"parameters": PARAMETERS | VALUES, "layer_range": VALUES}
    ),
    VALUES,
)
MERGE_DOCS = st.builds(
    lambda method, body, extra: {**({"merge_method": method} if method is not None else {}), **body, **extra},
    st.sampled_from([None, *merge_config.accepted_methods(), "passthrough", "task_arithmetic", "tiez"]) | VALUES,
    st.fixed_dictionaries(
        {},
        optional={
            "models": st.lists(SOURCE, max_size=3) | VALUES,
            "slices": st.lists(
                st.fixed_dictionaries(
                    {"sources": st.lists(SOURCE, max_size=2) | VALUES},
                    optional={"base_model": VALUES, "parameters": PARAMETERS, "residual_weight": VALUES},
                ),
                max_size=2,
            ),
            "base_model": WORDS | VALUES,
            "parameters": PARAMETERS | VALUES,
            "dtype": st.sampled_from(["float32", "bfloat16", "torch.float16", "int8"]) | VALUES,
            "tokenizer": VALUES,
            "tokenizer_source": VALUES,
            "chat_template": VALUES,
        },
    ),
    st.dictionaries(st.sampled_from(MERGE_KEYS) | st.text(max_size=6), VALUES, max_size=2),
)


@st.composite
def near_valid_merge(draw) -> dict:
    """A mergekit config that would load (a method, two models, their parameters), then now and then a
    value of another type, a gradient, filters, slices instead of models, or an unknown key."""
    method = draw(st.sampled_from(merge_config.accepted_methods()))
    params = merge_config.method_params(method)

    def setting(param):
        good = st.floats(0, 1) if param.type is float else st.booleans() if param.type is bool else WORDS
        if param.type is int:
            good = st.integers(0, 4)
        shaped = good | st.lists(good, min_size=2, max_size=3) | st.lists(st.fixed_dictionaries({"value": good},
                 optional={"filter": st.sampled_from(["mlp", "self_attn", "*"])}), min_size=1, max_size=2)  # fmt: skip
        return draw(VALUES if one_in(draw, 6) else shaped)

    def parameters():
        chosen = draw(st.lists(st.sampled_from(params), max_size=3, unique_by=lambda p: p.name)) if params else []
        return {p.name: setting(p) for p in chosen}

    doc: dict = {"merge_method": method}
    if one_in(draw, 4):
        doc["slices"] = [
            {
                "sources": [
                    {"model": m, "layer_range": draw(st.sampled_from([[0, 2], [1, 2], [0, 1], [2, 1]]))}
                    for m in ("org/a", "org/b")
                ]
            }  # fmt: skip
        ]
    else:
        doc["models"] = [{"model": m, "parameters": parameters()} for m in ("org/a", "org/b")]
    if draw(st.booleans()):
        doc["base_model"] = "org/base"
    doc["parameters"] = parameters()
    if one_in(draw, 3):
        doc[draw(st.sampled_from(MERGE_KEYS) | st.text(max_size=6))] = draw(VALUES)
    return doc


@FUZZ
@given(doc=near_valid_merge() | MERGE_DOCS)
@example(doc={"merge_method": "ties", "models": [{"model": HUGE, "parameters": {"weight": HUGE}}]})
def test_mergekit_yaml_loads_or_stops_in_one_line(workdir, doc):
    path = write(workdir, "merge.yaml", as_yaml(doc))
    loads_or_one_line("mergekit", lambda: merge_config.read(path), str(path))
    loads_or_one_line("mergekit dict", lambda: merge_config.read(doc), "config")


@FUZZ
@given(raw=RAW)
@example(raw=b"merge_method: ties\nmodels: &a [*a]\n")
@example(raw=b"merge_method: ties\nmodels:\n  - model: !!binary aGk=\n")
@example(raw=b"merge_method: ties\nmodels: [a, b]\nparameters: {weight: &w {value: *w}}\n")
def test_mergekit_yaml_from_raw_bytes(workdir, raw):
    path = write(workdir, "merge.raw.yaml", raw)
    loads_or_one_line("mergekit raw", lambda: merge_config.read(path), str(path))


STEP = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["a", "b", "steps", "1x", "a b", ""]) | VALUES,
        "kind": st.sampled_from([*KINDS, "merj"]) | VALUES,
        "config": st.one_of(
            st.dictionaries(st.sampled_from(["model", "tasks", "output", "teacher", "student"]), VALUES, max_size=3),
            MERGE_DOCS,
            documents(dotted_keys(SFTConfig)),
            VALUES,
        ),
    },
)
RECIPES = st.fixed_dictionaries(
    {}, optional={"steps": st.lists(STEP, max_size=3) | VALUES, "output": VALUES, "description": VALUES}
) | st.dictionaries(st.text(max_size=6), VALUES, max_size=3)


@st.composite
def near_valid_recipe(draw) -> dict:
    """Two steps that would validate (an eval of a hub model, a merge citing it), then now and then a name,
    a kind, a reference or a config value changed."""
    first = {"name": "a", "kind": "eval", "config": {"model": "org/m", "tasks": ["dates"], "limit": 2}}
    second = {"name": "b", "kind": "merge", "config": draw(near_valid_merge())}
    second["config"]["base_model"] = draw(st.sampled_from(["${steps.a.output}", "${steps.b.output}",
                                                           "${steps.zz.output}", "${a}", "org/base"]))  # fmt: skip
    steps = [first, second]
    if one_in(draw, 3):
        step = draw(st.sampled_from(steps))
        step[draw(st.sampled_from(["name", "kind", "config"]))] = draw(VALUES | WORDS)
    if one_in(draw, 3) and isinstance(first["config"], dict):
        first["config"][draw(st.sampled_from(["model", "tasks", "limit", "output", "num_fewshot"]))] = draw(VALUES)
    return {"steps": steps, "output": draw(st.sampled_from(["runs/r", "", "/"]) | WORDS)}


@FUZZ
@given(doc=near_valid_recipe() | RECIPES)
@example(doc={"steps": [{"name": "a", "kind": "eval", "config": {"model": HUGE, "tasks": ["dates"]}}]})
@example(doc={"steps": [{"name": "a", "kind": "eval", "config": {"model": "a\nb", "tasks": ["dates"]}}]})
@example(doc={"steps": [{"name": "a\nb", "kind": "eval\n", "config": {"model": "org/m", "tasks": ["${\n}"]}}]})
@example(doc={"output": "r\n", "steps": [{"name": "a", "kind": "eval", "config": {"output": "o"}}]})
def test_recipes_load_or_stop_in_one_line(workdir, doc):
    path = write(workdir, "recipe.yaml", as_yaml(doc))
    loads_or_one_line("recipe", lambda: load_recipe(path, KINDS), str(path))


@FUZZ
@given(raw=RAW)
@example(raw=b"steps:\n  - &a {name: a, kind: eval, config: {model: *a}}\n")
def test_recipes_from_raw_bytes(workdir, raw):
    path = write(workdir, "recipe.raw.yaml", raw)
    loads_or_one_line("recipe raw", lambda: load_recipe(path, KINDS), str(path))


DEEP = "[" * 1500 + "]" * 1500  # past Python's recursion limit: PyYAML's own reader recurses per level


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        (f"train: {DEEP}\n", [], "nest too deeply"),
        ("output: o\n", [f"train.lr={DEEP}"], "nests too deeply"),
        ("train: " + "[" * 70 + "]" * 70, [], "levels deep"),
    ],
    ids=["file", "override", "past-max-depth"],
)
def test_deep_nesting_is_one_line(workdir, text, overrides, fragment):
    """Kept out of the generated runs: each PyYAML RecursionError costs about a second."""
    path = write(workdir, "deep.yaml", text)
    with pytest.raises(UserError) as err:
        config_io.load(path, SFTConfig, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)
