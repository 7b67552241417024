"""Prompts and scores of an lm-eval task YAML already read (eval/lmeval_yaml.py), as lm-eval 0.4.13 makes them.

k shots drawn with lm-eval's seed (one extra, and the record itself dropped, when shots come from the scored
split); plain prompts or the chat template's multi-turn form; regex/take_first/lowercase filters; exact match
with its options, acc / acc_norm (log-likelihood per character), perplexity and the rolling metrics.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import string

from lmforge.eval.lmeval_yaml import Doc, YamlTask
from lmforge.eval.tasks import FEWSHOT_SEED


def shots_for(task: YamlTask, doc: Doc, rng: random.Random) -> list[Doc]:
    """The k shots of one record, drawn as lm-eval draws them (one extra when shots come from the scored split)."""
    if not task.num_fewshot:
        return []
    drawn = rng.sample(task.fewshot_docs, task.num_fewshot + (1 if task.fewshot_same_split else 0))
    return [shot for shot in drawn if shot.source != doc.source][: task.num_fewshot]


def _target_text(shot: Doc) -> str:
    """A shot's answer as shown: a multiple-choice shot shows its right choice, not its index."""
    return shot.choices[shot.target] if isinstance(shot.target, int) and shot.choices else str(shot.target)


def fewshot_text(task: YamlTask, shots: list[Doc]) -> str:
    out = ""
    for shot in shots:
        target = _target_text(shot)
        out += shot.text
        if target != "":
            out += task.target_delimiter + target + task.fewshot_delimiter
    return out


def build_context(
    task: YamlTask, doc: Doc, shots: list[Doc], system_instruction: str | None = None, tokenizer=None
) -> str:
    """The prompt for one record: lm-eval's plain text, or (with a tokenizer) its multi-turn chat-template form."""
    if system_instruction is not None and doc.description:
        system = f"{system_instruction}{task.fewshot_delimiter}{doc.description}"
    else:
        system = system_instruction if system_instruction is not None else doc.description
    if tokenizer is None:
        return system + fewshot_text(task, shots) + doc.text
    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:  # lm-eval 0.4.13 with a chat template: each shot a user turn and an assistant turn
        messages += [{"role": "user", "content": shot.text}, {"role": "assistant", "content": _target_text(shot)}]
    messages.append({"role": "user", "content": doc.text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def apply_filter(steps: list[dict], response: str) -> str:
    """One response through one filter pipeline (lm-eval's regex, take_first, lowercase, ...)."""
    for step in steps:
        function = step["function"]
        if function == "regex":
            found = step["compiled"].findall(response)
            try:
                match = found[step["group_select"]] if found else None
            except IndexError:
                match = None
            if isinstance(match, tuple):
                match = next((m for m in match if m), None)
            response = match.strip() if match is not None else step["fallback"]
        elif function == "lowercase":
            response = response.lower()
        elif function == "uppercase":
            response = response.upper()
        elif function == "remove_whitespace":
            response = response.lstrip()
    return response


def exact_match(prediction: str, reference: str, options: dict) -> float:
    """lm-eval's exact_match: optional regexes removed, case and punctuation ignored; no stripping."""
    for pattern in options.get("regexes_to_ignore") or []:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if options.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    for flag, chars in (("ignore_punctuation", string.punctuation), ("ignore_numbers", string.digits)):
        if options.get(flag):
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def _mean(name: str, key: str, values: list[float]) -> dict:
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {f"{name},{key}": statistics.fmean(values), f"{name}_stderr,{key}": stderr}


def score(
    loaded,
    task: YamlTask,
    docs: list[Doc],
    batch_size: int,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    max_window: int = 2048,
) -> tuple[dict, list[dict]]:
    """Metrics {"metric,filter": value, ...} and per-sample records for the scored `docs`."""
    from lmforge.eval import scoring

    model, tokenizer = loaded.model, loaded.tokenizer
    if task.output_type == "loglikelihood_rolling":
        texts = [str(doc.target) for doc in docs]
        totals = scoring.loglikelihood_rolling(model, tokenizer, texts, batch_size, max_length=max_window)
        lls = [total for total, _ in totals]
        words = sum(len(re.split(r"\s+", t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        values = {
            "word_perplexity": math.exp(-sum(lls) / words),
            "byte_perplexity": math.exp(-sum(lls) / n_bytes),
            "bits_per_byte": -sum(lls) / n_bytes / math.log(2),
        }
        metrics = {}
        for name in task.metrics:
            metrics |= {f"{name},none": values[name], f"{name}_stderr,none": None}
        samples = [{"target": t, "loglikelihood": ll} for t, ll in zip(texts, lls, strict=True)]
        return metrics, samples
    chat = tokenizer if apply_chat_template else None
    rng = random.Random(FEWSHOT_SEED)
    contexts = [build_context(task, doc, shots_for(task, doc, rng), system_instruction, chat) for doc in docs]
    if task.output_type == "generate_until":
        outputs = scoring.generate_until(model, tokenizer, contexts, task.until, task.max_gen_toks, batch_size)
        metrics, samples = {}, []
        per_filter = {name: [apply_filter(steps, out) for out in outputs] for name, steps in task.filters.items()}
        for name, filtered in per_filter.items():
            options = task.metrics.get("exact_match", {})
            hits = [exact_match(f, str(doc.target), options) for f, doc in zip(filtered, docs, strict=True)]
            metrics |= _mean("exact_match", name, hits)
        for index, (doc, context, out) in enumerate(zip(docs, contexts, outputs, strict=True)):
            filtered = {name: values[index] for name, values in per_filter.items()}
            samples.append({"input": context, "target": doc.target, "output": out, "filtered": filtered})
        return metrics, samples
    if task.output_type == "loglikelihood":
        results = scoring.loglikelihood(
            model, tokenizer, [(c, str(d.target)) for c, d in zip(contexts, docs, strict=True)], batch_size
        )
        metrics = {}
        if "perplexity" in task.metrics:
            mean_ll = statistics.fmean(ll for ll, _ in results)
            metrics |= {"perplexity,none": math.exp(-mean_ll), "perplexity_stderr,none": None}
        if "acc" in task.metrics:
            metrics |= _mean("acc", "none", [float(greedy) for _, greedy in results])
        samples = [
            {"input": c, "target": d.target, "loglikelihood": ll, "is_greedy": g}
            for c, d, (ll, g) in zip(contexts, docs, results, strict=True)
        ]
        return metrics, samples
    delimiter = "" if apply_chat_template else task.target_delimiter
    requests, owners = [], []
    for index, (context, doc) in enumerate(zip(contexts, docs, strict=True)):
        for choice in doc.choices:
            requests.append((context, delimiter + choice))
            owners.append(index)
    results = scoring.loglikelihood(model, tokenizer, requests, batch_size)
    acc, acc_norm, samples = [], [], []
    for index, (context, doc) in enumerate(zip(contexts, docs, strict=True)):
        lls = [ll for owner, (ll, _) in zip(owners, results, strict=True) if owner == index]
        normed = [ll / len(choice) for ll, choice in zip(lls, doc.choices, strict=True)]
        pick, pick_norm = lls.index(max(lls)), normed.index(max(normed))
        acc.append(float(pick == doc.target))
        acc_norm.append(float(pick_norm == doc.target))
        samples.append({"input": context, "target": doc.target, "loglikelihoods": lls, "pick": pick})
    metrics = {}
    if "acc" in task.metrics:
        metrics |= _mean("acc", "none", acc)
    if "acc_norm" in task.metrics:
        metrics |= _mean("acc_norm", "none", acc_norm)
    return metrics, samples
