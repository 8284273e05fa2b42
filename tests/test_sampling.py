"""Tests of glmrun.sampling on hand-made distributions, and against transformers' logits processors."""

from __future__ import annotations

import math

import pytest
import torch

from glmrun.errors import InvalidArgumentError
from glmrun.sampling import (
    SamplingParams,
    StopStringMatcher,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    greedy,
    make_generator,
    make_sampler,
    sample_from_logits,
    sample_rows,
)

hf = pytest.importorskip("transformers.generation.logits_process")


def logits_of(probs: list[float]) -> torch.Tensor:
    """A [1, V] row of logits whose softmax is ``probs``."""
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


# --- top-p -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_p(p: float, expected: set[int]) -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_top_p(logits, p)) == expected


def test_top_p_does_not_depend_on_token_order() -> None:
    logits = logits_of([0.05, 0.3, 0.5, 0.15])  # same distribution, shuffled
    assert kept(apply_top_p(logits, 0.7)) == {1, 2}


def test_top_p_always_keeps_the_top_token() -> None:
    logits = logits_of([0.1, 0.6, 0.3])
    assert kept(apply_top_p(logits, 1e-6)) == {1}


def test_top_p_leaves_kept_logits_unchanged() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    out = apply_top_p(logits, 0.7)
    torch.testing.assert_close(out[0, :2], logits[0, :2])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_matches_transformers(p: float) -> None:
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(1)) * 3
    expected = hf.TopPLogitsWarper(top_p=p)(torch.zeros(8, 1, dtype=torch.long), logits.clone())
    torch.testing.assert_close(apply_top_p(logits, p), expected)


# --- top-k -------------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(apply_top_k(logits, 2)) == {1, 3}
    assert kept(apply_top_k(logits, 1)) == {1}


def test_top_k_off_or_larger_than_vocab_keeps_everything() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0]])
    torch.testing.assert_close(apply_top_k(logits, 0), logits)
    torch.testing.assert_close(apply_top_k(logits, 10), logits)


def test_top_k_keeps_ties_with_the_kth() -> None:
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert kept(apply_top_k(logits, 1)) == {0, 2}


@pytest.mark.parametrize("k", [1, 5, 50, 499])
def test_top_k_matches_transformers(k: int) -> None:
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(2))
    expected = hf.TopKLogitsWarper(top_k=k)(torch.zeros(8, 1, dtype=torch.long), logits.clone())
    torch.testing.assert_close(apply_top_k(logits, k), expected)


# --- temperature -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_scales_logits(t: float) -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    torch.testing.assert_close(apply_temperature(logits, t), logits / t)


def test_low_temperature_sharpens_high_flattens() -> None:
    logits = logits_of([0.6, 0.3, 0.1])
    assert apply_temperature(logits, 0.5).softmax(-1)[0, 0] > 0.6 + 1e-3
    assert apply_temperature(logits, 2.0).softmax(-1)[0, 0] < 0.6 - 1e-3


def test_temperature_zero_is_refused_by_the_step() -> None:
    with pytest.raises(InvalidArgumentError, match="temperature"):
        apply_temperature(torch.zeros(1, 3), 0.0)


# --- repetition penalty ------------------------------------------------------------------------


def test_repetition_penalty_sign_handling() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    prev = torch.tensor([[0, 1, 1]])  # token 1 seen twice: penalized once
    out = apply_repetition_penalty(logits, prev, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_repetition_penalty_with_no_history_or_penalty_one_is_identity() -> None:
    logits = torch.tensor([[2.0, -2.0]])
    torch.testing.assert_close(apply_repetition_penalty(logits, torch.empty(1, 0, dtype=torch.long), 1.5), logits)
    torch.testing.assert_close(apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 1.0), logits)


@pytest.mark.parametrize("penalty", [0.7, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 100, generator=g)
    prev = torch.randint(0, 100, (4, 30), generator=g)
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty=penalty)(prev, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, prev, penalty), expected)


# --- dtype and purity --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_steps_work_in_float32_and_leave_input_alone(dtype: torch.dtype) -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4)).to(dtype)
    before = logits.clone()
    prev = torch.tensor([[1, 2], [3, 4]])
    outs = [
        apply_repetition_penalty(logits, prev, 1.3),
        apply_repetition_penalty(logits, prev, 1.0),
        apply_temperature(logits, 0.7),
        apply_top_k(logits, 5),
        apply_top_k(logits, 0),
        apply_top_p(logits, 0.5),
        apply_top_p(logits, 1.0),
    ]
    assert all(o.dtype == torch.float32 for o in outs)
    assert all(o.data_ptr() != logits.data_ptr() for o in outs)
    assert torch.equal(logits, before)
    make_sampler(SamplingParams(top_k=5, repetition_penalty=1.2))(logits, prev, make_generator(0, "cpu"))
    assert torch.equal(logits, before)


# --- greedy and sampling -----------------------------------------------------------------------


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [3.0, -1.0, 2.0]])
    assert greedy(logits).tolist() == [1, 0]
    assert greedy(logits).dtype == torch.long


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0, do_sample=False)])
def test_greedy_params_pick_argmax(params: SamplingParams) -> None:
    assert params.greedy
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(5))
    out = make_sampler(params)(logits, torch.empty(16, 0, dtype=torch.long), None)
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_applies_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    sampler = make_sampler(SamplingParams(do_sample=False, repetition_penalty=2.0))
    assert sampler(logits, torch.tensor([[0]]), None).tolist() == [1]


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    assert make_generator(7, torch.device("cpu")).initial_seed() == 7


def test_same_seed_same_tokens() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(6))
    prev = torch.empty(4, 0, dtype=torch.long)
    sampler = make_sampler(SamplingParams(temperature=1.5, top_p=0.99))

    def draws(seed: int) -> list[list[int]]:
        gen = make_generator(seed, "cpu")
        return [sampler(logits, prev, gen).tolist() for _ in range(20)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    mask = expected > 0
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def test_sample_from_logits_frequencies_match_softmax() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 40_000
    draws = sample_from_logits(logits_of(probs.tolist()).expand(n, -1), make_generator(0, "cpu"))
    counts = torch.bincount(draws, minlength=4).double()
    assert chi_square(counts, probs.double()) < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_sampler_frequencies_match_truncated_distribution() -> None:
    # top_p=0.75 keeps {0, 1, 2} (0.35 + 0.25 + 0.2 = 0.8 >= 0.75), then renormalizes.
    probs = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]
    n = 40_000
    sampler = make_sampler(SamplingParams(temperature=1.0, top_p=0.75))
    draws = sampler(logits_of(probs).expand(n, -1), torch.empty(n, 0, dtype=torch.long), make_generator(1, "cpu"))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[3:].sum() == 0
    expected = torch.tensor([0.35, 0.25, 0.2, 0, 0, 0], dtype=torch.float64) / 0.8
    assert chi_square(counts, expected) < 13.8  # 2 degrees of freedom, p = 0.001


def test_sampler_frequencies_with_temperature_and_top_k() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    n = 40_000
    sampler = make_sampler(SamplingParams(temperature=0.5, top_p=1.0, top_k=3))
    draws = sampler(
        logits_of(probs.tolist()).expand(n, -1), torch.empty(n, 0, dtype=torch.long), make_generator(2, "cpu")
    )
    counts = torch.bincount(draws, minlength=4).double()
    sharpened = probs[:3] ** 2  # softmax(log p / 0.5) is p^2, renormalized
    expected = torch.cat([sharpened / sharpened.sum(), torch.zeros(1, dtype=torch.float64)])
    assert counts[3] == 0
    assert chi_square(counts, expected) < 13.8


# --- per-row batches ---------------------------------------------------------------------------


def test_sample_rows_mixes_greedy_and_sampled_rows() -> None:
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(8))
    params = [
        SamplingParams(do_sample=False),
        SamplingParams(temperature=1.2, top_k=20, seed=11),
        SamplingParams(temperature=0.0, repetition_penalty=5.0),
        SamplingParams(top_p=0.9, seed=12),
    ]
    top = int(logits[2].argmax())
    prev = [torch.empty(0, dtype=torch.long), torch.tensor([1, 2]), torch.tensor([top]), torch.tensor([3])]
    gens = [make_generator(p.seed, "cpu") for p in params]
    out = sample_rows(logits, params, prev, gens)

    assert out.shape == (4,) and out.dtype == torch.long
    assert out[0] == logits[0].argmax()
    assert out[2] == apply_repetition_penalty(logits[2:3], prev[2].view(1, -1), 5.0).argmax()
    for i in (1, 3):
        alone = make_sampler(params[i])(logits[i : i + 1], prev[i].view(1, -1), make_generator(params[i].seed, "cpu"))
        assert out[i] == alone[0]


def test_sample_rows_checks_lengths() -> None:
    with pytest.raises(InvalidArgumentError, match="one params"):
        sample_rows(torch.zeros(2, 5), [SamplingParams()], [torch.empty(0, dtype=torch.long)], [None])


# --- params ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_new_tokens", 0),
        ("max_length", 0),
        ("seed", "42"),
        ("do_sample", 1),
        ("stop", ("ok", "")),
        ("stop", "</s>"),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams().replace(**{field: value})


def test_replace_and_unknown_fields() -> None:
    base = SamplingParams()
    changed = base.replace(top_k=40, stop=["\n\n"])
    assert changed.top_k == 40 and changed.stop == ("\n\n",) and base.top_k == 0
    hash(changed)
    with pytest.raises(InvalidArgumentError, match="top_q"):
        base.replace(top_q=0.5)


def test_chatglm2_defaults() -> None:
    p = SamplingParams.chatglm2_defaults()
    assert (p.max_length, p.do_sample, p.top_p, p.temperature) == (8192, True, 0.8, 0.8)
    assert not p.greedy


# --- stop strings ------------------------------------------------------------------------------


def run_matcher(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stops)
    shown = ""
    for delta in deltas:
        text, stopped = m.feed(delta)
        shown += text
        if stopped:
            return shown, True
    return shown + m.flush(), False


def test_stop_split_across_deltas() -> None:
    m = StopStringMatcher(["<|user|>"])
    assert m.feed("Hello <|") == ("Hello ", False)  # "<|" might start the stop string: held back
    assert m.feed("us") == ("", False)
    assert m.feed("er|> more") == ("", True)
    assert m.feed("later") == ("", True)
    assert m.flush() == ""


def test_held_text_is_released_when_it_cannot_be_a_stop() -> None:
    m = StopStringMatcher(["<|user|>"])
    assert m.feed("a <|us") == ("a ", False)
    assert m.feed("age") == ("<|usage", False)


def test_multiple_stops_first_occurrence_wins() -> None:
    assert run_matcher(["STOP", "\n\n"], ["one two", "\n", "\nthree STOP"]) == ("one two", True)
    assert run_matcher(["STOP", "\n\n"], ["one ST", "OP\n\n"]) == ("one ", True)
    # Both complete in the same delta: the earlier one wins.
    assert run_matcher(["bc", "abcd"], ["xab", "cd"]) == ("x", True)
    # The matcher stops as soon as one is complete; it does not wait for a longer, earlier one.
    assert run_matcher(["bc", "abcd"], ["xabc", "d"]) == ("xa", True)


def test_stop_at_the_very_start() -> None:
    assert run_matcher(["###"], ["###", "rest"]) == ("", True)


def test_no_stop_flushes_everything() -> None:
    text = ["The answer", " is <", "4", "2 and <", "|"]
    assert run_matcher(["<|user|>"], text) == ("".join(text), False)
    assert run_matcher([], text) == ("".join(text), False)


def test_matcher_rejects_empty_stop() -> None:
    with pytest.raises(InvalidArgumentError, match="stop"):
        StopStringMatcher(["ok", ""])


def test_model_defaults_per_family() -> None:
    from glmrun.api import sampling_params

    glm = SamplingParams.model_defaults("chatglm")
    assert glm == SamplingParams.chatglm2_defaults() and not glm.greedy
    llama = SamplingParams.model_defaults("llama")
    assert llama.greedy
    assert not sampling_params(llama, {"temperature": 0.7}).greedy  # a temperature turns sampling on
    assert sampling_params(llama, {"temperature": 0}).greedy
    assert sampling_params(glm, {"temperature": 0}).greedy
    assert sampling_params(glm, {"temperature": 0.5, "do_sample": False}).greedy  # an explicit choice wins
