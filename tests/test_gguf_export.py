"""`lmforge export --gguf`: llama models (and LoRA adapters, merged) written as f16 or q8_0 GGUF files that
lmforge's own GGUF path loads back with the same greedy generations (f16) or near-same logits (q8_0)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import gguf
import pytest
import torch
from cli_helpers import run_cli

from lmforge.errors import UserError
from lmforge.finetune.sft import finetune
from lmforge.models.gguf import read_gguf_metadata
from lmforge.models.gguf_export import export_gguf
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama, make_tiny_qwen2

PROMPTS = ["the answer is", "Hello world", "once upon a time there", "2 + 2 =", "where is the", "Héllo ☃"]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It's 4."}]
Q8_0_MAX_LOGIT_GAP = 0.4  # measured 0.28 on `tiny_llama` (logits up to 4.3); block scales 3% off give 0.65


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """`tiny_llama` as loaded, and loaded back from its f16 and q8_0 exports."""
    out = tmp_path_factory.mktemp("exported")
    paths = {kind: export_gguf(tiny_llama, out / f"tiny-{kind}.gguf", kind) for kind in ("f16", "q8_0")}
    return SimpleNamespace(
        paths=paths,
        source=load_model(tiny_llama, device="cpu"),
        f16=load_model(paths["f16"], device="cpu"),
        q8_0=load_model(paths["q8_0"], device="cpu"),
    )


def token_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def f16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every weight rounded to float16 and back: what an exact f16 export holds."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.half().float())
    return rounded


def q8_0_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every matrix through gguf-py's q8_0 quantiser and back: what a q8_0 export holds."""
    rounded, q8_0 = copy.deepcopy(model), gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() == 2:
                blocks = gguf.quants.quantize(param.numpy(), q8_0)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, q8_0)))
    return rounded


def greedy(loaded, prompt: str, tokens: int = 16) -> list[int]:
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    return out[0, ids.shape[1] :].tolist()


def tensor_types(path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def test_f16_export_is_the_source_model_rounded_to_f16(exported):
    ids = token_batch(exported.source.model.config.vocab_size)
    got = logits(exported.f16.model, ids)
    # exact up to float32 arithmetic against the source with f16 weights: names and Q/K permutation are right
    torch.testing.assert_close(got, logits(f16_rounded(exported.source.model), ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, logits(exported.source.model, ids), atol=2e-2, rtol=0)  # f16 tolerance


def test_f16_export_gives_the_same_greedy_generations(exported):
    generations = [greedy(exported.source, prompt) for prompt in PROMPTS]
    assert len({tuple(tokens) for tokens in generations}) > 1  # the prompts lead somewhere different
    assert [greedy(exported.f16, prompt) for prompt in PROMPTS] == generations


def test_q8_0_export_keeps_per_token_logits_close(exported):
    ids = token_batch(exported.source.model.config.vocab_size)
    expected = logits(exported.source.model, ids)
    got = logits(exported.q8_0.model, ids)
    torch.testing.assert_close(got, logits(q8_0_rounded(exported.source.model), ids), atol=1e-5, rtol=0)
    gap = (got - expected).abs().max().item()
    print(f"q8_0 max per-token logit difference: {gap:.4f} (logits up to {expected.abs().max():.2f})")
    assert 0 < gap < Q8_0_MAX_LOGIT_GAP
    assert exported.paths["q8_0"].stat().st_size < 0.65 * exported.paths["f16"].stat().st_size


def test_matrices_take_the_type_and_norms_stay_f32(exported):
    for kind, matrix in (("f16", "F16"), ("q8_0", "Q8_0")):
        types = tensor_types(exported.paths[kind])
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == matrix
        assert types["token_embd.weight"] == types["output.weight"] == matrix  # untied: both written
        assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
        assert read_gguf_metadata(exported.paths[kind])["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{matrix}"]


def test_tokenizer_and_chat_template_travel_with_the_file(exported):
    metadata = read_gguf_metadata(exported.paths["f16"])
    source = exported.source.tokenizer
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.chat_template"] == source.chat_template
    assert metadata["tokenizer.ggml.bos_token_id"] == source.bos_token_id
    assert metadata["tokenizer.ggml.eos_token_id"] == source.eos_token_id
    assert metadata["tokenizer.ggml.add_bos_token"] is False  # the tiny tokenizer adds no bos
    loaded = exported.f16.tokenizer
    rendered = source.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    for text in [*PROMPTS, rendered]:
        assert loaded(text)["input_ids"] == source(text)["input_ids"], text


def test_tied_embeddings_are_written_once(tiny_llama_tied, tmp_path):
    path = export_gguf(tiny_llama_tied, tmp_path / "tied.gguf", "f16")
    assert "output.weight" not in tensor_types(path)
    source, back = load_model(tiny_llama_tied, device="cpu"), load_model(path, device="cpu")
    assert back.model.config.tie_word_embeddings
    ids = token_batch(source.model.config.vocab_size)
    torch.testing.assert_close(logits(back.model, ids), logits(f16_rounded(source.model), ids), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # PEFT reads the old name
def test_lora_adapter_is_merged_into_its_base(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_model(tiny_llama, device="cpu").model
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    path = export_gguf(tmp_path / "adapter", tmp_path / "adapted.gguf", "f16")
    merged = load_model(tmp_path / "adapter", device="cpu").model
    ids = token_batch(merged.config.vocab_size)
    got = logits(load_model(path, device="cpu").model, ids)
    torch.testing.assert_close(got, logits(f16_rounded(merged), ids), atol=1e-5, rtol=0)
    assert (got - logits(load_model(tiny_llama, device="cpu").model, ids)).abs().max() > 0.1  # not the bare base


def test_cli_exports_q8_0(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli.gguf"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", str(tiny_llama), "--gguf", str(out), "--type", "q8_0")
    assert code == 0, err
    assert "cli.gguf" in stdout and tensor_types(out)["blk.0.attn_k.weight"] == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.gguf"]  # no staging file left beside it


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.mark.parametrize(
    ("model", "target", "extra", "message"),
    [
        ("qwen2", "out.gguf", [], "it is a 'qwen2' model and GGUF export supports only llama"),
        ("llama", "missing/out.gguf", [], "folder missing does not exist (for missing/out.gguf)"),
        ("llama", "existing.gguf", [], "existing.gguf exists: pass --overwrite"),
        ("llama", "out.gguf", ["--type", "q4_0"], "unknown GGUF type 'q4_0': use one of f16, q8_0"),
        ("llama", "out.bin", [], "must end in .gguf"),
        ("nowhere", "out.gguf", [], "no folder nowhere here"),
    ],
)
def test_bad_inputs_one_line_and_nothing_written(
    model, target, extra, message, tiny_llama, tiny_qwen2, tmp_path, monkeypatch, capsys
):
    (tmp_path / "existing.gguf").write_bytes(b"keep me")
    monkeypatch.chdir(tmp_path)
    ref = {"qwen2": str(tiny_qwen2), "llama": str(tiny_llama)}.get(model, model)
    code, _, err = run_cli(monkeypatch, capsys, "export", ref, "--gguf", target, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lmforge: error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf"]
    assert (tmp_path / "existing.gguf").read_bytes() == b"keep me"


def test_overwrite_replaces_an_existing_file(tiny_llama, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"old")
    export_gguf(tiny_llama, tmp_path / "x.gguf", "f16", overwrite=True)
    assert read_gguf_metadata(tmp_path / "x.gguf")["general.architecture"] == "llama"


def test_rope_scaling_is_refused_before_a_file_appears(tmp_path):
    folder = make_tiny_llama(tmp_path / "scaled")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope type 'linear' is not supported"):
        export_gguf(folder, tmp_path / "scaled.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scaled"]


def test_interrupt_while_writing_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    write_tensors = gguf.GGUFWriter.write_tensors_to_file

    def interrupted(self, *args, **kwargs):
        write_tensors(self, *args, **kwargs)  # the tensors are on disk under the staging name: then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_llama, tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_export_gguf_is_public_api():
    import lmforge

    assert lmforge.export_gguf is export_gguf and "export_gguf" in lmforge.__all__


QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?",
    "Name three primary colours.", "What is 12 times 7?", "Give me a synonym for happy.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What does a thermometer measure?",
    "List two planets in our solar system.", "What is the opposite of cold?", "Who wrote Romeo and Juliet?",
    "How do you boil an egg?", "What is photosynthesis?", "Suggest a name for a pet cat.",
    "What is the largest ocean on Earth?", "Explain what a verb is.", "How many days are in a leap year?",
    "What colour are bananas when ripe?", "Describe a rainbow in one sentence.",
]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned_default(tmp_path_factory) -> str:
    """A LoRA adapter fine-tuned from the default model on `dates` (a few steps: the weights must differ from the
    base, not be good), so the export goes through the adapter merge as a user's fine-tune does."""
    out = tmp_path_factory.mktemp("finetuned") / "sft-dates"
    finetune(
        output=str(out),
        model="default",
        data={"task": "dates", "limit": 64},
        train={"max_steps": 6, "batch_size": 4, "lr": 1e-3},
        eval={"limit": 1, "probe": False},
    )
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "finetuned"])
def test_default_model_round_trip(tmp_path, model, request):
    """Acceptance on SmolLM2-135M-Instruct (as shipped, and a LoRA fine-tune of it), 20 chat prompts, 32 greedy
    tokens each.

    The f16 file must give exactly the generations of the source with its weights rounded to f16, and logits
    within f16 tolerance of the float32 source; a generation that still differs from the float32 source's
    turns where f16 rounding flips a near tie (the margin is printed). The q8_0 file must hold exactly the
    source's matrices through gguf-py's q8_0 quantiser, stay close per token and agree on the top token.
    """
    ref = "default" if model == "default" else request.getfixturevalue("finetuned_default")
    source = load_model(ref, device="cpu")
    paths = {kind: export_gguf(ref, tmp_path / f"smollm2-{kind}.gguf", kind) for kind in ("f16", "q8_0")}
    assert read_gguf_metadata(paths["f16"])["tokenizer.chat_template"] == source.tokenizer.chat_template
    f16, q8_0 = (load_model(paths[kind], device="cpu") for kind in ("f16", "q8_0"))
    prompts = [
        source.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    assert [f16.tokenizer(p)["input_ids"] for p in prompts] == [source.tokenizer(p)["input_ids"] for p in prompts]
    rounded = SimpleNamespace(model=f16_rounded(source.model))
    q8_0_reference = q8_0_rounded(source.model)
    generations = {
        name: batch_greedy(loaded.model, source.tokenizer, prompts, 32)
        for name, loaded in (("source", source), ("rounded", rounded), ("f16", f16), ("q8_0", q8_0))
    }
    assert generations["f16"] == generations["rounded"]

    gaps, margins, top1, positions, scale = {"f16": 0.0, "q8_0": 0.0}, [], 0, 0, 0.0
    for prompt, tokens, f16_tokens in zip(prompts, generations["source"], generations["f16"], strict=True):
        prompt_ids = source.tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + tokens])
        expected = logits(source.model, ids)
        for kind, loaded in (("f16", f16), ("q8_0", q8_0)):
            gaps[kind] = max(gaps[kind], (logits(loaded.model, ids) - expected).abs().max().item())
        got = logits(q8_0.model, ids)[0, len(prompt_ids) - 1 :]
        torch.testing.assert_close(got, logits(q8_0_reference, ids)[0, len(prompt_ids) - 1 :], atol=1e-4, rtol=0)
        want = expected[0, len(prompt_ids) - 1 :]
        top1 += (got.argmax(-1) == want.argmax(-1)).sum().item()
        positions += len(want)
        scale = max(scale, want.abs().max().item())
        if f16_tokens != tokens:
            step = next(i for i, (a, b) in enumerate(zip(tokens, f16_tokens, strict=True)) if a != b)
            top = expected[0, len(prompt_ids) + step - 1].topk(2).values
            margins.append((step, round((top[0] - top[1]).item(), 4)))
    same = {kind: sum(a == b for a, b in zip(generations[kind], generations["source"], strict=True)) for kind in gaps}
    sizes = {kind: path.stat().st_size for kind, path in paths.items()}
    print(f"\nidentical to float32 source (of 20): {same}; f16 divergences (token, source top-2 margin): {margins}")
    print(f"max per-token logit gap vs float32 source: {gaps} (logits up to {scale:.1f}); bytes on disk: {sizes}")
    print(f"q8_0 top token = source's at {top1} of {positions} generated positions")
    # measured on this machine: f16 0.041, q8_0 1.68 with logits up to 40, top token 649 of 660
    assert gaps["f16"] < 0.1 and gaps["q8_0"] < 3.0 and top1 >= 0.95 * positions
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


def batch_greedy(model: torch.nn.Module, tokenizer, prompts: list[str], tokens: int) -> list[list[int]]:
    """Greedy continuations of left-padded prompts, exactly `tokens` long (eos does not stop them)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        )  # fmt: skip
    return out[:, batch["input_ids"].shape[1] :].tolist()


def test_recipe_export_step_feeds_a_later_step(tiny_llama, tmp_path):
    import io

    from rich.console import Console

    from lmforge.recipe.runner import run_recipe

    steps = [
        {"name": "gguf", "kind": "export", "config": {"model": str(tiny_llama), "type": "q8_0"}},
        {
            "name": "check",
            "kind": "eval",
            "config": {"model": "${steps.gguf.output}", "tasks": ["dates"], "limit": 2, "footprint": False},
        },
    ]
    root = run_recipe(steps=steps, output=str(tmp_path / "out"), isolate=False, console=Console(file=io.StringIO()))
    assert tensor_types(root / "gguf" / "gguf.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    assert (root / "check" / "results.json").is_file()
    with pytest.raises(UserError, match="step 'gguf'.*q4_0"):
        run_recipe(steps=[{**steps[0], "config": {"model": str(tiny_llama), "type": "q4_0"}}], dry_run=True)
