"""The one DataConfig: sources (list or the data.path shorthand), blend schedules, held-out sets, the
earlier spellings read for one release, and one-line errors naming the field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tessera.config import ConfigError, from_dict
from tessera.data.blend import BlendKnot, BlendSchedule
from tessera.data.config import DataConfig, DataSource, load_data_config, normalize_data_section


def _cfg(**kw) -> DataConfig:
    return from_dict(DataConfig, normalize_data_section(kw, "test"), "test")


def test_sources_names_weights_and_the_path_shorthand():
    cfg = _cfg(sources=[{"path": "d/web/", "weight": 3}, {"path": "d/chat", "name": "sft"}])
    got = cfg.train_sources()
    assert [(s.name, s.path, s.weight) for s in got] == [("web", "d/web/", 3.0), ("sft", "d/chat", 1.0)]
    assert cfg.schedule().weights_dict(0) == {"web": 0.75, "sft": 0.25}
    assert cfg.sources[0].weight == 3 and cfg.sources[1].weight is None  # the request is not rewritten
    one = _cfg(path="d/x", eval_path="d/h")
    assert [(s.name, s.weight) for s in one.train_sources()] == [("train", 1.0)]  # the name old checkpoints hold
    assert [s.name for s in one.held_out_sources()] == ["heldout"]
    assert _cfg().train_sources() == [] and _cfg().held_out_sources() == []  # no data: the mock dataset


def test_blend_knots_and_the_step_ramp():
    cfg = _cfg(sources=[{"path": "a"}, {"path": "b"}],
               blend={"ramp": "step", "knots": [{"step": 0, "weights": {"a": 3, "b": 1}},
                                                {"step": 10, "weights": {"b": 1}}]})
    s = cfg.schedule()
    assert s.weights_dict(9) == {"a": 0.75, "b": 0.25} and s.weights_dict(10) == {"a": 0.0, "b": 1.0}
    lin = BlendSchedule(["a", "b"], [BlendKnot(0, {"a": 1}), BlendKnot(10, {"b": 1})], "linear")
    assert np.allclose(lin.weights(5), [0.5, 0.5]) and np.allclose(s.weights(5), [0.75, 0.25])


@pytest.mark.parametrize("data,match", [
    ({"path": "a", "sources": [{"path": "b"}]}, r"^data.path and data.sources: give one"),
    ({"sources": [{"name": "x"}]}, r"^data.sources\[0\].path: missing"),
    ({"sources": [{"path": "d/a"}, {"path": "e/a"}]}, r"^data.sources\[1\].name: 'a' is also data.sources\[0\]'s"),
    ({"sources": [{"path": "a", "name": "a b"}]}, r"^data.sources\[0\].name: 'a b' must be one word"),
    ({"sources": [{"path": "a", "weight": -1}]}, r"^data.sources\[0\].weight: -1.0 is not a finite number >= 0"),
    ({"sources": [{"path": "a", "weight": 0}, {"path": "b", "weight": 0}]}, r"^data.sources: every weight is 0"),
    ({"sources": [{"path": "a", "weight": 2}], "blend": {"knots": [{"step": 0, "weights": {"a": 1}}]}},
     r"^data.sources\[0\].weight: give the weights either per source or in data.blend.knots"),
    ({"sources": [{"path": "a"}], "blend": {"knots": [{"step": 0, "weights": {"z": 1}}]}},
     r"^data.blend.knots\[0\]: unknown source\(s\) \['z'\]"),
    ({"sources": [{"path": "a"}], "blend": {"knots": [{"step": 5, "weights": {"a": 1}},
                                                       {"step": 5, "weights": {"a": 1}}]}},
     r"^data.blend.knots: steps must strictly increase"),
    ({"path": "a", "blend": {"ramp": "step", "knots": []}, "eval_sources": [{"path": "h", "weight": 1}]},
     r"^data.eval_sources\[0\].weight: held-out sets are evaluated one by one"),
    ({"eval_path": "h", "eval_sources": [{"path": "g"}]}, r"^data.eval_path and data.eval_sources: give one"),
    ({"blend": {"knots": [{"step": 0, "weights": {"a": 1}}]}}, r"^data.blend: knots without data.sources"),
    ({"path": "a", "document_mask": True, "reset_attention_mask": True}, r"^data.document_mask: .* turn"),
])
def test_bad_data_sections_fail_in_one_line_naming_the_field(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(**data).validate()
    assert "\n" not in str(e.value)


def test_earlier_spellings_load_with_a_warning_or_say_where_things_went(tmp_path):
    old = tmp_path / "data.yaml"
    old.write_text("sources: {web: d/web, synth: d/synth}\n"
                   "weave: {ramp: linear, knots: [{step: 0, weights: {web: 1}}, {step: 4, weights: {synth: 1}}]}\n")
    with pytest.warns(FutureWarning, match="data.weave is deprecated"):
        cfg = load_data_config(old)
    assert [s.name for s in cfg.train_sources()] == ["web", "synth"] and cfg.blend.ramp == "linear"
    assert cfg.schedule().weights_dict(4) == {"web": 0.0, "synth": 1.0}
    with pytest.warns(FutureWarning, match="--weave"):
        assert load_data_config(old, ["--weave.ramp", "step"]).blend.ramp == "step"
    # what a run config saved by the earlier trainer holds: empty weights and weave
    assert _cfg(path="d", weights={}, weave=[]).train_sources()[0].name == "train"
    with pytest.raises(ConfigError, match=r"data.weights: give each source's weight in data.sources"):
        _cfg(path="d", weights={"d": 1.0})
    with pytest.raises(ConfigError, match=r"data.global_batch is not a data setting: see parallel.global_batch_size"):
        _cfg(path="d", global_batch=8)


def test_a_training_config_is_a_data_config_too(tmp_path):
    from tessera.data.config import batch_sizes

    run = tmp_path / "run.yaml"
    run.write_text("model: {preset: tiny}\nparallel: {global_batch_size: 16, micro_batch_size: 4}\n"
                   "data: {sources: [{path: d/a, weight: 1}, {path: d/b, weight: 3}], seq_length: 32}\n")
    cfg = load_data_config(run)
    assert cfg.seq_length == 32 and cfg.schedule().weights_dict(0) == {"a": 0.25, "b": 0.75}
    assert batch_sizes(run) == (16, 4)
    with pytest.raises(ConfigError, match=rf"^{run}: data.sources\[1\].weight"):
        load_data_config(run, ["--sources", "[{path: a}, {path: b, weight: -2}]"])


def test_open_names_the_missing_directory(tmp_path, tiny_pretok):
    cfg = _cfg(sources=[{"path": str(tiny_pretok["train"])}, {"path": str(tmp_path / "nope"), "name": "b"}])
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].path: .*nope is not a directory"):
        cfg.open_sources()
    assert DataSource().weight is None


def test_opening_bad_sources_fails_in_one_line_naming_the_field(tmp_path, tiny_pretok):
    from tessera.tokenizers.vocab import Vocabulary

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _cfg(sources=[{"path": str(tiny_pretok["train"])}, {"path": str(empty), "name": "e"}])
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].path: .*not a complete pretokenized dataset"):
        cfg.open_sources()
    with pytest.raises(ConfigError, match=r"^data.path: .*no vocabulary file"):
        _cfg(path=str(empty)).vocabulary()
    # another vocabulary: the iterator refuses to blend them
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_pretok["train"].iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    v = Vocabulary.load(other)
    dataclasses.replace(v, num_text_tokens=v.num_text_tokens + 1).save(other)
    two = _cfg(sources=[{"path": str(tiny_pretok["train"])}, {"path": str(other)}])
    with pytest.raises(ConfigError, match=r"^data: sources use different vocabularies"):
        two.iterator(4, 2)
