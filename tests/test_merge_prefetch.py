"""The read-ahead hint a merge gives before importing torch: which files it names, and that it never fails."""

from __future__ import annotations

import yaml
from merge_helpers import family, weights

from lmforge.merge import engine, prefetch
from lmforge.merge.run import merge


def _model(folder, size: int):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    (folder / "config.json").write_text("{}")
    return folder


def test_hints_every_local_input_of_models_slices_and_adapters(tmp_path):
    a, b, c = (_model(tmp_path / name, size) for name, size in (("a", 1000), ("b", 2000), ("c", 4000)))
    config = {
        "merge_method": "ties",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": f"{b}+{tmp_path / 'adapter'}"}, {"model": "org/hub-model"}],
        "slices": [{"sources": [{"model": str(c), "layer_range": [0, 2]}]}],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert prefetch.prefetch_inputs(str(path)) == 7000  # a hub id is not a local folder: nothing to hint
    assert prefetch.prefetch_inputs(config) == 7000


def test_bad_configs_and_large_inputs_hint_nothing(tmp_path, monkeypatch):
    _model(tmp_path / "a", 1000)
    (tmp_path / "broken.yaml").write_text("models: [unclosed")
    assert prefetch.prefetch_inputs(str(tmp_path / "broken.yaml")) == 0  # the merge itself reports the error
    assert prefetch.prefetch_inputs(str(tmp_path / "missing.yaml")) == 0
    monkeypatch.setattr(prefetch, "_available_bytes", lambda: 3000)  # a quarter of it is under the inputs' size
    assert prefetch.prefetch_inputs({"models": [{"model": str(tmp_path / "a")}]}) == 0


def test_the_engine_asks_the_kernel_to_read_ahead_every_input_it_reads(tmp_path, monkeypatch):
    base, a, b = (str(m) for m in family(tmp_path / "models"))
    hinted, read = [], []
    monkeypatch.setattr(engine, "prefetch", lambda info, rows=None: hinted.append((info.file, info.start, rows)))
    real_read = engine.read_rows
    monkeypatch.setattr(
        engine,
        "read_rows",
        lambda info, rows=None, dtype=None: read.append((info.file, info.start, rows)) or real_read(info, rows, dtype),
    )
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in (a, b)],
    }
    out = merge(config, tmp_path / "out", progress=False)
    assert read and set(read) <= set(hinted)  # every read was hinted (the engine hints items before it starts them)
    assert len(hinted) == len(set(hinted))  # and once
    assert weights(out).keys() == weights(base).keys()
