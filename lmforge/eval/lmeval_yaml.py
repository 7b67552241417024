"""lm-eval task YAML over local data: read the file and render every record, as lm-eval 0.4.13 does [lme].

A task YAML names data files (`dataset_path: json|csv|parquet` or a local folder, `dataset_kwargs.data_files`),
the split scored (`test_split`, else `validation_split`) and where shots come from (`fewshot_split`, else
`training_split`, else `validation_split`, else the scored split), and turns each record into a prompt, a
target and choices with `doc_to_text` / `doc_to_target` / `doc_to_choice`: a bare column name, or a Jinja
template (sandboxed, StrictUndefined). Everything is read and rendered here, before a model loads, so a
missing column, a template error or an unsupported key is one line naming the file and key.

Data files are read by eval/lmeval_data.py; prompts and scores are made by eval/lmeval_score.py. Prompts
follow lm-eval: [system instruction + fewshot_delimiter] + description, then k shots, each
`text + target_delimiter + target + fewshot_delimiter`, then the record's text. With the chat template on,
the system prompt is a system turn, each shot a user turn (its text) and an assistant turn (its target), the
record's text the last user turn, rendered with the generation prompt: what lm-eval 0.4.13's
--apply_chat_template gives (multi-turn shots, checked by bench/lmeval_task_conformance.py); multiple-choice
continuations then lose the target delimiter, as in lm-eval. Keys lmforge does not implement are refused,
never ignored.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from lmforge.errors import UserError
from lmforge.eval.lmeval_data import read_splits

OUTPUT_TYPES = ("generate_until", "loglikelihood", "multiple_choice", "loglikelihood_rolling")
DEFAULT_METRICS = {
    "generate_until": ["exact_match"],
    "loglikelihood": ["perplexity", "acc"],
    "multiple_choice": ["acc", "acc_norm"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
}
KIND = {
    "generate_until": "generate",
    "loglikelihood": "loglikelihood",
    "multiple_choice": "multiple_choice",
    "loglikelihood_rolling": "perplexity",
}
SUPPORTED_KEYS = {
    "task", "task_alias", "dataset_path", "dataset_kwargs", "training_split", "validation_split", "test_split",
    "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "fewshot_delimiter",
    "num_fewshot", "output_type", "generation_kwargs", "filter_list", "metric_list", "include", "description",
}  # fmt: skip
# Keys that only label or group the task in lm-eval's registry: read, kept in results.json, change no score.
METADATA_KEYS = {"tag", "group", "metadata"}
FILTERS = ("regex", "take_first", "lowercase", "uppercase", "remove_whitespace")
EXACT_MATCH_OPTIONS = {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"}


@dataclass(frozen=True)
class Doc:
    """One rendered record: the prompt text, its target, its choices (multiple choice) and the description."""

    text: str
    target: str | int
    choices: tuple[str, ...] | None
    description: str
    source: dict


@dataclass(frozen=True)
class YamlTask:
    """A task YAML read and rendered: what `score` needs, with no file access left."""

    path: Path
    name: str
    output_type: str
    docs: list[Doc]
    fewshot_docs: list[Doc]
    fewshot_same_split: bool
    num_fewshot: int
    target_delimiter: str
    fewshot_delimiter: str
    until: tuple[str, ...]
    max_gen_toks: int
    filters: dict[str, list[dict]]
    metrics: dict[str, dict]
    config: dict = field(default_factory=dict)


class _Loader(yaml.SafeLoader):
    """Safe YAML that names lm-eval's `!function` (Python code) instead of failing obscurely."""


def _function_tag(loader, node):
    raise UserError(
        f"{loader.name}: '!function {node.value}' runs Python code from the task folder, which lmforge does not "
        "do: write the field as a column name or a Jinja template"
    )


_Loader.add_constructor("!function", _function_tag)


def is_task_yaml(name: str) -> bool:
    return str(name).endswith((".yaml", ".yml"))


def read_config(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML's keys with its `include` chain merged underneath (the including file wins)."""
    if not path.is_file():
        raise UserError(f"task file not found: {path}: check the path")
    if path.resolve() in seen:
        raise UserError(f"{path}: include loops back to itself: remove the cycle")
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.load(handle, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a task YAML is a mapping of keys (task, dataset_path, doc_to_text, ...)")
    include = loaded.pop("include", None)
    if include is None:
        return loaded
    if not isinstance(include, str):
        raise UserError(f"{path}: key 'include' must be one file name")
    base = read_config(path.parent / include, (*seen, path.resolve()))
    return base | loaded


def load_task(path: str | Path, num_fewshot: int | None = None) -> YamlTask:
    """Read, check and render a task YAML; `num_fewshot` (when not None) replaces the file's num_fewshot."""
    path = Path(path)
    config = read_config(path)
    where = str(path)
    unknown = sorted(set(config) - SUPPORTED_KEYS - METADATA_KEYS)
    if unknown:
        raise UserError(
            f"{where}: key '{unknown[0]}' is not supported by lmforge (supported: {', '.join(sorted(SUPPORTED_KEYS))})"
            ": remove it or evaluate this task with lm-eval itself"
        )
    name = config.get("task")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: key 'task' (the task's name) is missing")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"{where}: output_type '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
    splits = read_splits(path, config)
    scored = config.get("test_split") or config.get("validation_split")
    if not scored:
        raise UserError(f"{where}: neither test_split nor validation_split is set: name the split to score")
    for key in ("test_split", "validation_split", "training_split", "fewshot_split"):
        if config.get(key) and config[key] not in splits:
            raise UserError(
                f"{where}: {key} '{config[key]}' is not a split of the data (splits: {', '.join(splits)}): "
                "name it in dataset_kwargs.data_files"
            )
    shot_split = next(
        (config[k] for k in ("fewshot_split", "training_split", "validation_split") if config.get(k)), scored
    )
    k = config.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    if not isinstance(k, int) or k < 0:
        raise UserError(f"{where}: num_fewshot must be a whole number >= 0")
    if output_type == "loglikelihood_rolling" and k:
        raise UserError(f"{where}: loglikelihood_rolling scores whole texts and takes no shots: set num_fewshot 0")
    render = _Renderer(where, config, output_type)
    docs = [render(row, f"{splits[scored][0]} ({scored} split)") for row in splits[scored][1]]
    if not docs:
        raise UserError(f"{where}: split '{scored}' has no records")
    shots = docs if shot_split == scored else [render(r, f"{splits[shot_split][0]}") for r in splits[shot_split][1]]
    same = config.get("fewshot_split") is not None and config.get("fewshot_split") == config.get("test_split")
    if k and len(shots) < k + (1 if same else 0):
        raise UserError(f"{where}: split '{shot_split}' has {len(shots)} records, too few for {k} shots: lower -k")
    generation = _generation(where, config, output_type)
    return YamlTask(
        path=path,
        name=name,
        output_type=output_type,
        docs=docs,
        fewshot_docs=shots,
        fewshot_same_split=same,
        num_fewshot=k,
        target_delimiter=_text_key(where, config, "target_delimiter", " "),
        fewshot_delimiter=_text_key(where, config, "fewshot_delimiter", "\n\n"),
        until=generation[0],
        max_gen_toks=generation[1],
        filters=_filters(where, config, output_type),
        metrics=_metrics(where, config, output_type),
        config={key: config[key] for key in sorted(config) if key in METADATA_KEYS | {"task_alias"}}
        | {"scored_split": scored, "fewshot_split": shot_split},
    )


def _text_key(where: str, config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str):
        raise UserError(f"{where}: key '{key}' must be a string")
    return value


# ---- rendering ----


def _regex_replace(text: str, pattern: str, replacement: str, count: int = 0) -> str:
    return re.sub(pattern, replacement, text, count=count)


_JINJA = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = _regex_replace


class _Renderer:
    """Turns one record into a Doc with the YAML's doc_to_* fields, as lm-eval reads each field."""

    def __init__(self, where: str, config: dict, output_type: str) -> None:
        self.where, self.config, self.output_type = where, config, output_type
        self.needs_choices = output_type == "multiple_choice"
        if self.needs_choices and config.get("doc_to_choice") is None:
            raise UserError(f"{where}: output_type multiple_choice needs doc_to_choice (a column, list or template)")
        if (
            output_type != "multiple_choice"
            and config.get("doc_to_choice") is not None
            and output_type != "generate_until"
        ):
            raise UserError(f"{where}: doc_to_choice is only used by multiple_choice and generate_until tasks")
        default_text = "" if output_type == "loglikelihood_rolling" else None
        self.text = config.get("doc_to_text", default_text)
        self.target = config.get("doc_to_target")
        for key, value in (("doc_to_text", self.text), ("doc_to_target", self.target)):
            if value is None:
                raise UserError(f"{where}: key '{key}' is missing (a column name or a Jinja template)")
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise UserError(f"{where}: key '{key}' must be a column name, a Jinja template or an index")

    def __call__(self, row: dict, source: str) -> Doc:
        choices = self._choices(row, source) if self.config.get("doc_to_choice") is not None else None
        text = self._field("doc_to_text", self.text, row, source, choices)
        target = self._field("doc_to_target", self.target, row, source, choices)
        if isinstance(text, int):
            if choices is None or not 0 <= text < len(choices):
                raise UserError(f"{self.where}: doc_to_text gave index {text} with no such choice ({source})")
            text = choices[text]
        if isinstance(target, list):  # lm-eval reads a list target as several golds; lmforge scores one
            raise UserError(f"{self.where}: doc_to_target gave a list ({source}): lmforge scores one target per record")
        if self.output_type == "multiple_choice":
            target = self._gold(target, choices, source)
        elif isinstance(target, int) and choices is not None:
            target = choices[target] if 0 <= target < len(choices) else str(target)
        elif not isinstance(target, str):
            target = str(target)
        description = self._render("description", self.config.get("description") or "", row, source)
        return Doc(text=str(text), target=target, choices=choices, description=description, source=row)

    def _gold(self, target, choices: tuple[str, ...], source: str) -> int:
        if isinstance(target, str):
            if target not in choices:
                raise UserError(f"{self.where}: target '{target}' is not one of the choices {list(choices)} ({source})")
            return choices.index(target)
        if not 0 <= target < len(choices):
            raise UserError(f"{self.where}: target index {target} is outside the {len(choices)} choices ({source})")
        return target

    def _field(self, key: str, spec, row: dict, source: str, choices) -> str | int | list:
        if isinstance(spec, int):
            return spec
        if spec in row:  # a bare column name, as lm-eval reads it
            value = row[spec]
            return value if isinstance(value, (str, int, list)) and not isinstance(value, bool) else str(value)
        if spec and re.fullmatch(r"[A-Za-z_]\w*", spec):
            raise UserError(
                f"{self.where}: {key} '{spec}' names no column of {source} (columns: {', '.join(row)}): fix the "
                "name, or write a template such as '{{" + (next(iter(row), "column")) + "}}'"
            )
        rendered = self._render(key, spec, row, source)
        if rendered.isdigit() and choices is not None:
            return int(rendered)
        if key == "doc_to_target" and len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
            try:
                return ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                return rendered
        return rendered

    def _choices(self, row: dict, source: str) -> tuple[str, ...]:
        spec = self.config["doc_to_choice"]
        if isinstance(spec, list):
            value = spec
        elif isinstance(spec, dict):
            value = list(spec.values())
        elif isinstance(spec, str) and spec in row:
            value = row[spec]
        elif isinstance(spec, str):
            rendered = self._render("doc_to_choice", spec, row, source)
            try:
                value = ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                raise UserError(
                    f"{self.where}: doc_to_choice rendered {rendered[:60]!r}, not a list ({source}): "
                    "render a Python list such as {{[a, b]}}"
                ) from None
        else:
            raise UserError(f"{self.where}: doc_to_choice must be a column name, a list or a template")
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise UserError(f"{self.where}: doc_to_choice must give a list of at least two choices ({source})")
        return tuple(str(choice) for choice in value)

    def _render(self, key: str, template: str, row: dict, source: str) -> str:
        try:
            return _JINJA.from_string(template).render(**row)
        except UndefinedError as err:
            missing = re.search(r"'([^']+)' is undefined", str(err))
            column = missing.group(1) if missing else str(err)
            raise UserError(
                f"{self.where}: {key} names column '{column}' that {source} lacks (columns: {', '.join(row)})"
            ) from None
        except TemplateError as err:
            raise UserError(f"{self.where}: {key} is not a valid Jinja template ({err})") from None


# ---- generation, filters, metrics ----


def _generation(where: str, config: dict, output_type: str) -> tuple[tuple[str, ...], int]:
    kwargs = config.get("generation_kwargs")
    if kwargs is None:
        return (_text_key(where, config, "fewshot_delimiter", "\n\n"),), 256
    if output_type != "generate_until":
        raise UserError(f"{where}: generation_kwargs is only for output_type generate_until")
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}: generation_kwargs must be a mapping")
    for key, value in kwargs.items():
        if key == "do_sample" and value is not False:
            raise UserError(f"{where}: generation_kwargs.do_sample must be false: lmforge generates greedily")
        if key == "temperature" and value != 0:
            raise UserError(f"{where}: generation_kwargs.temperature must be 0: lmforge generates greedily")
        if key not in ("until", "max_gen_toks", "do_sample", "temperature"):
            raise UserError(
                f"{where}: generation_kwargs.{key} is not supported (until, max_gen_toks, do_sample: false)"
            )
    until = kwargs.get("until", [_text_key(where, config, "fewshot_delimiter", "\n\n")])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise UserError(f"{where}: generation_kwargs.until must be a string or a list of strings")
    max_gen_toks = kwargs.get("max_gen_toks", 256)
    if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise UserError(f"{where}: generation_kwargs.max_gen_toks must be a whole number >= 1")
    return tuple(until), max_gen_toks


def _filters(where: str, config: dict, output_type: str) -> dict[str, list[dict]]:
    """{filter name: steps}; without filter_list lm-eval's one 'none' filter (take the first answer)."""
    entries = config.get("filter_list")
    if entries is None:
        return {"none": [{"function": "take_first"}]}
    if output_type != "generate_until":
        raise UserError(f"{where}: filter_list is only supported for output_type generate_until")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where}: filter_list must be a list of {{name, filter: [steps]}}")
    pipelines = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "filter" not in entry:
            raise UserError(f"{where}: each filter_list entry needs a 'name' and a 'filter' list")
        steps = []
        for step in entry["filter"]:
            function = step.get("function") if isinstance(step, dict) else None
            if function not in FILTERS:
                raise UserError(
                    f"{where}: filter '{entry['name']}' uses function '{function}', not supported "
                    f"(supported: {', '.join(FILTERS)})"
                )
            allowed = {"function"} | ({"regex_pattern", "group_select", "fallback"} if function == "regex" else set())
            extra = sorted(set(step) - allowed)
            if extra:
                raise UserError(f"{where}: filter '{entry['name']}' step {function} has unsupported key '{extra[0]}'")
            if function == "regex":
                step = dict(step)
                pattern = step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")
                try:
                    compiled = re.compile(pattern)
                except re.error as err:
                    raise UserError(f"{where}: filter '{entry['name']}' regex_pattern is invalid ({err})") from None
                if compiled.groups == 0:
                    raise UserError(
                        f"{where}: filter '{entry['name']}' regex_pattern {pattern!r} has no group: wrap the part "
                        "to keep in parentheses, e.g. '#### (\\d+)'"
                    )
                if not isinstance(step.get("group_select", 0), int):
                    raise UserError(f"{where}: filter '{entry['name']}' group_select must be a whole number")
                step |= {"compiled": compiled, "group_select": step.get("group_select", 0)}
                step.setdefault("fallback", "[invalid]")
            steps.append(step)
        pipelines[entry["name"]] = steps
    return pipelines


def _metrics(where: str, config: dict, output_type: str) -> dict[str, dict]:
    """{metric: options}; the output type's defaults (as lm-eval's) when metric_list is absent."""
    entries = config.get("metric_list")
    if entries is None:
        return {name: {} for name in DEFAULT_METRICS[output_type]}
    allowed = set(DEFAULT_METRICS[output_type]) | ({"perplexity"} if output_type == "loglikelihood" else set())
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where}: metric_list must be a list of {{metric: NAME, ...}}")
    metrics = {}
    for entry in entries:
        name = entry.get("metric") if isinstance(entry, dict) else None
        if name not in allowed:
            raise UserError(
                f"{where}: metric '{name}' is not supported for {output_type} (supported: {', '.join(sorted(allowed))})"
            )
        options = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}
        extra = sorted(set(options) - (EXACT_MATCH_OPTIONS if name == "exact_match" else set()))
        if extra:
            raise UserError(f"{where}: metric {name} option '{extra[0]}' is not supported")
        expected = "mean" if name in ("exact_match", "acc", "acc_norm") else None
        if "aggregation" in entry and entry["aggregation"] not in (expected, name):
            raise UserError(f"{where}: metric {name} aggregation '{entry['aggregation']}' is not supported")
        metrics[name] = options
    return metrics
