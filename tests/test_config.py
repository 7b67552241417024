"""The config system: YAML + overrides into frozen dataclasses, round trips, and one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lmforge import config
from lmforge.errors import UserError
from lmforge.overrides import command_line


@dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-4
    """Peak learning rate."""
    max_steps: int | None = None
    """Stop after this many optimizer steps.

    null trains whole epochs.
    """
    schedule: Literal["cosine", "linear"] = "cosine"
    """Learning-rate schedule after warmup."""


@dataclass(frozen=True)
class LoraCfg:
    r: int = 8
    """Adapter rank."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj"])
    """Module names to adapt."""


@dataclass(frozen=True)
class DataCfg:
    path: Path = Path("train.jsonl")
    """Training records."""
    weights: dict[str, float] = field(default_factory=dict)
    shape: tuple[int, ...] = (1, 2)
    seed: int | str = 0
    name: str = "1e3"


@dataclass(frozen=True)
class Top:
    model: str
    """Model reference: local dir, hub id or .gguf file."""
    train: TrainCfg = field(default_factory=TrainCfg)
    lora: LoraCfg | None = None
    data: DataCfg = field(default_factory=DataCfg)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error(path: Path | None, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as info:
        config.load(path, Top, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_reads_nested_sections_and_keeps_defaults(tmp_path):
    path = write(tmp_path, "model: m\ntrain:\n  lr: 1\n  schedule: linear\nlora:\n  r: 4\ndata:\n  path: d.jsonl\n")
    cfg = config.load(path, Top)
    assert cfg.train == TrainCfg(lr=1.0, schedule="linear")
    assert isinstance(cfg.train.lr, float)  # an int is accepted for a float
    assert cfg.lora == LoraCfg(r=4, target_modules=["q_proj"])  # optional section given as a mapping
    assert cfg.data.path == Path("d.jsonl") and cfg.data.shape == (1, 2)


def test_exponent_floats_and_empty_file(tmp_path):
    assert config.load(write(tmp_path, "model: m\ntrain: {lr: 1e-4}\n"), Top).train.lr == 1e-4
    assert config.load(write(tmp_path, ""), Top, ["model=m"]) == Top(model="m")


def test_round_trip_load_dump_load(tmp_path):
    path = write(tmp_path, "model: m\nlora: {r: 2, target_modules: [a, b]}\ndata: {weights: {x: 2}, shape: [3]}\n")
    cfg = config.load(path, Top, ["train.max_steps=5", "data.seed=abc"])
    out = tmp_path / "lmforge.yaml"
    config.dump(cfg, out)
    assert config.load(out, Top) == cfg
    assert out.read_text().startswith("model: m\ntrain:\n")  # field order, not sorted
    assert config.to_dict(cfg)["data"] == {
        "path": "train.jsonl",
        "weights": {"x": 2.0},
        "shape": [3],
        "seed": "abc",
        "name": "1e3",
    }


def test_overrides_parse_yaml_values_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "model: m\ntrain: {lr: 0.1, max_steps: 10}\nlora: {r: 4}\n")
    overrides = [
        "train.lr=3e-4",
        "lora.r=2",
        "lora.r=16",  # later wins
        "lora.target_modules=[q_proj,v_proj]",
        "data.path=foo.jsonl",
        "train.max_steps=null",
        "data.weights.a=1",
    ]
    cfg = config.load(path, Top, overrides)
    assert cfg.train == TrainCfg(lr=3e-4, max_steps=None)
    assert cfg.lora == LoraCfg(r=16, target_modules=["q_proj", "v_proj"])
    assert cfg.data.path == Path("foo.jsonl") and cfg.data.weights == {"a": 1.0}
    assert config.load(path, Top, ["lora=null"]).lora is None


def test_load_without_a_file_uses_defaults_and_overrides():
    cfg = config.load(None, Top, ["model=tiny", "lora.r=16"])
    assert cfg == Top(model="tiny", lora=LoraCfg(r=16))  # an override creates an absent optional section


def test_configs_are_frozen():
    cfg = config.from_dict({"model": "m"}, Top)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


def test_union_arms_and_fixed_tuples():
    @dataclass(frozen=True)
    class Pair:
        xy: tuple[int, str] = (0, "a")
        n: int | str = 0

    assert config.from_dict({"xy": [1, "b"], "n": "x"}, Pair) == Pair(xy=(1, "b"), n="x")
    with pytest.raises(UserError, match=r"'xy' must be a list of 2 items"):
        config.from_dict({"xy": [1]}, Pair)
    with pytest.raises(UserError, match=r"'n' must be an int or a str, got 1.5 \(float\)"):
        config.from_dict({"n": 1.5}, Pair)


def test_field_docs_reads_attribute_docstrings():
    assert config.field_docs(TrainCfg) == {
        "lr": "Peak learning rate.",
        "max_steps": "Stop after this many optimizer steps.\n\nnull trains whole epochs.",
        "schedule": "Learning-rate schedule after warmup.",
    }
    assert config.field_docs(DataCfg) == {"path": "Training records."}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: m\ntrain: {lrate: 1}\n", "unknown key 'train.lrate': did you mean 'train.lr'?"),
        ("model: m\nr: 4\n", "unknown key 'r': did you mean 'lora.r'?"),
        ("model: m\nlr: 4\n", "unknown key 'lr': did you mean 'train.lr'?"),
        (
            "model: m\ntrain: {zzz: 1}\n",
            "unknown key 'train.zzz': valid keys under 'train' are lr, max_steps, schedule",
        ),
        ("model: m\ntrain: {lr: abc}\n", "key 'train.lr' must be a float, got 'abc' (str)"),
        ("model: m\nlora: {r: true}\n", "key 'lora.r' must be an int, got True (bool)"),
        ("model: m\ntrain: {max_steps: abc}\n", "key 'train.max_steps' must be an int or null, got 'abc' (str)"),
        ("model: m\nlora: {target_modules: [a, 1]}\n", "key 'lora.target_modules[1]' must be a str, got 1 (int)"),
        ("model: m\ntrain: 5\n", "key 'train' must be a mapping, got 5 (int)"),
        ("model: m\nlora: abc\n", "key 'lora' must be a mapping or null, got 'abc' (str)"),
        ("model: m\ndata: {path: ''}\n", "key 'data.path' must be a path (string), got '' (str)"),
        ("model: m\ntrain: {schedule: cosin}\n", "key 'train.schedule' must be one of 'cosine', 'linear', got 'cosin'"),
        (
            "train: {}\n",
            "missing required key 'model' (Model reference: local dir, hub id or .gguf file): "
            "set it in the config file or pass model=VALUE",
        ),
        ("- model\n", "the top level must be a mapping of key: value lines, got ['model'] (list)"),
        ("model: m\ntrain:\n  lr: 1\n  lr: 2\n", "invalid YAML at line 4, column 3: duplicate key 'lr'"),
        ("model: m\ntrain: [1\n", "invalid YAML at line 3"),
    ],
)
def test_file_errors_are_one_line_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr"], "override 'train.lr': write it as key.sub=value"),
        (["train..lr=1"], "override 'train..lr=1': write it as key.sub=value"),
        (["train.lrate=1"], "override: unknown key 'train.lrate': did you mean 'train.lr'?"),
        (["train.lr=abc"], "override: key 'train.lr' must be a float, got 'abc' (str)"),
        (["train.lr.x=1"], "override: key 'train.lr' must be a float, got {'x': 1} (dict)"),
        (["lora.target_modules=[a"], "override 'lora.target_modules=[a': the value is not valid YAML"),
    ],
)
def test_override_errors_say_override(tmp_path, overrides, expected):
    assert expected in error(write(tmp_path, "model: m\n"), overrides)


def test_errors_blame_the_file_when_an_override_is_unrelated(tmp_path):
    path = write(tmp_path, "model: m\ntrain: {lrate: 1}\n")
    assert error(path, ["train.lr=1"]).startswith(f"{path}: unknown key 'train.lrate'")
    assert error(None).startswith("config: missing required key 'model'")


def test_missing_file_and_bad_arguments(tmp_path):
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found: check the path"
    with pytest.raises(TypeError):
        config.load(None, Top, "model=m")
    with pytest.raises(UserError, match=r"^here: the top level must be a mapping"):
        config.from_dict([1], Top, where="here")


def test_resolve_takes_a_path_a_dict_keywords_or_a_built_config(tmp_path):
    built = config.load(None, Top, ["model=m"])
    assert config.resolve(built, Top) is built
    assert config.resolve(None, Top, ["model=m"]) == built
    path = tmp_path / "c.yaml"
    config.dump(built, path)
    assert config.resolve(path, Top) == built
    assert config.resolve({"model": "m"}, Top) == built
    assert config.resolve(None, Top, model="m") == built
    # Overrides and keywords apply over any form; a keyword section sets only the keys it names.
    assert config.resolve(built, Top, ["model=x"]).model == "x"
    path.write_text("model: m\ntrain: {lr: 0.5, max_steps: 3}\n", encoding="utf-8")
    got = config.resolve(path, Top, ["train.max_steps=4"], train={"schedule": "linear"})
    assert got.train == TrainCfg(lr=0.5, max_steps=4, schedule="linear")
    assert config.resolve(path, Top, train=TrainCfg(lr=0.25)).train == TrainCfg(lr=0.25)
    with pytest.raises(UserError, match=r"^keyword argument: key 'train.lr' must be a float, got 'x' \(str\)$"):
        config.resolve(path, Top, train={"lr": "x"})
    with pytest.raises(TypeError, match="YAML path, a dict or a Top"):
        config.resolve(3, Top)


@dataclass(frozen=True)
class Ranged:
    """A config whose __post_init__ checks ranges the way the commands' configs do."""

    size: int = 1
    rate: float | None = None
    share: float = 0.5

    def __post_init__(self) -> None:
        config.at_least(self, "size", 1)
        config.above(self, "rate", 0)
        config.within(self, "share", 0, 1, high_open=True)


@dataclass(frozen=True)
class HasRanged:
    inner: Ranged = field(default_factory=Ranged)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.size=0"], "override: inner.size must be >= 1, got 0"),
        (["inner.rate=-1.5"], "override: inner.rate must be > 0, got -1.5"),
        (["inner.share=1"], "override: inner.share must be in [0, 1), got 1.0"),
    ],
)
def test_range_checks_name_the_full_key_and_its_origin(overrides, message):
    with pytest.raises(UserError) as err:
        config.load(None, HasRanged, overrides)
    assert str(err.value) == message
    assert config.load(None, HasRanged, ["inner.rate=null", "inner.share=0"]).inner == Ranged(share=0.0)


def test_range_check_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "inner: {size: -2}\n")
    with pytest.raises(UserError, match=rf"^{path}: inner.size must be >= 1, got -2$"):
        config.load(path, HasRanged)
    with pytest.raises(ValueError, match="size must be >= 1"):  # built directly, the class still refuses
        Ranged(size=0)


FLAGS = {"--steps": ("train.max_steps", 2), "--lr": ("train.lr", None), "--resume": ("resume", False)}


@pytest.mark.parametrize(
    "args",
    [["train.max_steps=2.5"], ["c.yaml", "train={max_steps: 3}"], ["train.max_steps=null"]],
)
def test_a_flag_and_an_override_of_one_key_must_agree(args):
    with pytest.raises(UserError) as err:
        command_line(args, FLAGS)
    assert str(err.value) == (
        f"--steps 2 and override '{args[-1]}' set train.max_steps to different values: give only one of them"
    )


def test_command_line_splits_the_config_and_puts_flags_last():
    config_path, overrides = command_line(["c.yml", "train.max_steps=2", "train.lr=0.1"], FLAGS)
    assert config_path == "c.yml"
    assert overrides == ["train.max_steps=2", "train.lr=0.1", "train.max_steps=2"]  # equal values agree
    flags = {"--columns": ("data.columns", {"prompt": "q"}), "--resume": ("resume", True)}
    assert command_line(["data.columns.prompt=q"], flags)[1][-2:] == [
        'data.columns={"prompt": "q"}',
        "resume=true",
    ]
    with pytest.raises(UserError, match="^--columns .* and override 'data.columns.prompt=x' set data.columns"):
        command_line(["data.columns.prompt=x"], flags)
    with pytest.raises(UserError, match="^--resume and override 'resume=false' set resume to different"):
        command_line(["resume=false"], flags)
