"""The side-by-side micro-benchmarks run and report consistent figures (no timing asserts)."""

from __future__ import annotations

import pytest

from cachekit import microbench


def test_structure_on_the_toy_model_reports_a_lossless_layer():
    r = microbench.structure("toy", repeats=1, num_steps=4)
    assert r["sampler"].endswith("ns4")
    assert r["max_abs_diff"] <= 1e-4
    assert r["flop_ratio"] > 1.0          # chunked skips finished and pending chunks
    assert r["vanilla_s"] > 0 and r["chunked_s"] > 0
    # the toy adapter has no batching switches
    assert "chunked_per_chunk_s" not in r and "vanilla_per_branch_s" not in r
    assert "variants_max_abs_diff" not in r


def test_structure_on_a_batching_adapter_times_every_chunked_path(monkeypatch):
    from cachekit_models.refdit.adapter import RefDiTAdapter

    from test_refdit import tiny_model

    adapter = RefDiTAdapter(tiny_model(2))
    monkeypatch.setattr(microbench, "get_registry", lambda: _OneAdapter(adapter))
    r = microbench.structure("refdit", repeats=1, num_steps=3, ar_step=1, num_frames=8)
    assert r["max_abs_diff"] <= 1e-4
    assert r["variants_max_abs_diff"] <= 1e-5
    for name in ("chunked_per_chunk", "chunked_per_branch", "vanilla_per_branch"):
        assert r[f"{name}_s"] > 0
    assert r["speedup_median"] > 0 and r["speedup_vs_stock_median"] > 0
    # the switches are restored
    assert adapter.chunk_batching is True and adapter.branch_batching is True


class _OneAdapter:
    def __init__(self, adapter):
        self.adapter = adapter

    def create_adapter(self, name):
        return self.adapter


def test_cli_cases_and_errors(capsys):
    assert microbench.main(["structure", "--model", "toy", "--repeats", "1",
                            "--case", "num_steps=3", "--case", "num_steps=4,ar_step=1"]) == 0
    out = capsys.readouterr().out
    assert "| sampler | flop_ratio |" in out and out.count("sampler_nf8") == 2
    assert microbench.main(["structure", "--model", "toy", "--case", "num_steps"]) == 2
    assert "--case" in capsys.readouterr().err
    assert microbench.main(["structure", "--model", "toy", "--case", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [("a=1,b=2", {"a": "1", "b": "2"}), ("", {}),
                                           (" a = x ,", {"a": "x"})])
def test_parse_case(text, expected):
    assert microbench._parse_case(text) == expected
