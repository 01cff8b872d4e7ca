"""Baseline rules (uniform FFN width, ShortGPT, attention removal) against brute force, and block influence."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch

from puzzle.search.baselines import BASELINES, block_influence, choose_baseline, uniform_ffn
from solvers import Budget, Scenario
from solvers.io import problem_from_tables

ATT = {"gqa:2": (1.0, 100), "no_op": (0.0, 0)}  # decode ms, params
FFN = {"swiglu:64": (2.0, 300), "swiglu:32": (1.1, 150), "linear": (0.4, 40), "no_op": (0.0, 0)}
LAYERS = 4


def _problem(speedup: float):
    scores, costs = [], []
    for layer in range(LAYERS):
        for (a, (a_ms, a_p)), (f, (f_ms, f_p)) in itertools.product(ATT.items(), FFN.items()):
            label, parent = f"{a}|{f}", (a, f) == ("gqa:2", "swiglu:64")
            scores.append({"layer": layer, "variant": label, "is_parent": parent, "kl": 0.0 if parent else 1.0})
            costs.append({"layer": layer, "variant": label, "is_parent": parent, "params": a_p + f_p,
                          "weight_bytes": 2.0 * (a_p + f_p), "kv_bytes_per_token": 8.0 if a != "no_op" else 0.0,
                          "decode_ms": a_ms + f_ms, "prefill_ms": 10 * (a_ms + f_ms)})
    costs.append({"layer": -1, "variant": "fixed", "is_parent": False, "params": 50, "weight_bytes": 100.0,
                  "kv_bytes_per_token": 0.0, "decode_ms": 0.5, "prefill_ms": 5.0})
    return problem_from_tables(pd.DataFrame(scores), pd.DataFrame(costs), score_column="kl",
                               budget=Budget(speedup=speedup), scenario=Scenario(name="decode", phase="decode", batch=1, length=15))


PARENT_MS = 0.5 + LAYERS * 3.0


@pytest.mark.parametrize("speedup", [1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 40.0])
def test_uniform_ffn_is_the_widest_width_that_meets_the_budget(speedup):
    choice = uniform_ffn(_problem(speedup))
    meets = [f for f, (ms, _) in FFN.items() if PARENT_MS / (0.5 + LAYERS * (1.0 + ms)) >= speedup - 1e-9]
    assert choice.feasible == bool(meets)
    if meets:  # FFN is ordered widest first: the first width that meets the budget
        assert choice.labels == tuple([f"gqa:2|{meets[0]}"] * LAYERS)
        assert choice.speedup == pytest.approx(PARENT_MS / (0.5 + LAYERS * (1.0 + FFN[meets[0]][0])))
    else:
        assert "no uniform FFN width" in choice.detail


@pytest.mark.parametrize("speedup", [1.1, 1.5, 2.5, 4.0])
def test_shortgpt_removes_the_fewest_lowest_influence_layers(speedup):
    influence = pd.DataFrame({"layer": range(LAYERS), "layer_bi": [0.5, 0.1, 0.3, 0.2],
                              "attention_bi": [0.4, 0.3, 0.2, 0.1]})
    choice = choose_baseline("shortgpt", _problem(speedup), influence)
    order = [1, 3, 2, 0]
    k = next(k for k in range(LAYERS + 1) if PARENT_MS / (0.5 + (LAYERS - k) * 3.0) >= speedup - 1e-9)
    removed = {i for i, label in enumerate(choice.labels) if label == "no_op|no_op"}
    assert choice.feasible and removed == set(order[:k])


def test_attention_removal_reports_infeasible_instead_of_faking():
    influence = pd.DataFrame({"layer": range(LAYERS), "layer_bi": [0.5] * 4, "attention_bi": [0.4, 0.3, 0.2, 0.1]})
    ok = choose_baseline("attention_removal", _problem(1.15), influence)  # 12.5 / 10.5 = 1.19: 2 attentions gone
    assert ok.feasible and ok.labels == ("gqa:2|swiglu:64",) * 2 + ("no_op|swiglu:64",) * 2
    bad = choose_baseline("attention_removal", _problem(2.0), influence)  # at most 12.5 / 8.5 = 1.47x
    assert not bad.feasible and bad.speedup == pytest.approx(PARENT_MS / 8.5)
    assert all(label.startswith("no_op|") for label in bad.labels)
    with pytest.raises(ValueError, match="unknown baseline"):
        choose_baseline("magic", _problem(1.2), influence)
    assert set(BASELINES) == {"uniform_ffn", "shortgpt", "attention_removal"}


def test_block_influence_is_zero_for_an_identity_layer_and_nan_without_attention(tiny_text_parent):
    from puzzle.fusion.derive import derive_model, without_attention
    from puzzle.loading import load_model

    model = load_model(tiny_text_parent)
    model = derive_model(model, without_attention(model.config.blocks, [2]))
    with torch.no_grad():  # layer 1 becomes the identity: no attention output, no FFN output
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    df = block_influence(model, ids, chunk=2)
    assert list(df.layer) == list(range(model.config.num_hidden_layers))
    assert df.layer_bi[1] == pytest.approx(0.0, abs=1e-6) and df.attention_bi[1] == pytest.approx(0.0, abs=1e-6)
    assert df.attention_bi.isna().tolist() == [i == 2 for i in df.layer]
    others = df.drop(index=1)
    assert (others.layer_bi > 1e-4).all() and (others.layer_bi < 2).all()
    # the same as computing the cosines by hand from the hidden states
    with torch.no_grad():
        _, _, hidden = model.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    manual = 1 - torch.nn.functional.cosine_similarity(hidden[0], hidden[1 + 0], dim=-1).mean().item()
    assert df.layer_bi[0] == pytest.approx(manual, rel=1e-5)
