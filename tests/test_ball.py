"""bilora.sharpness.ball: the one-step and projected attacks and random directions in a global Frobenius ball.

The reference is the quadratic of tests/test_sharpness (one adapted linear layer, MSE, float64):
L(W' + Δ) − L(W') = <G, Δ> + Σ_i Δ_i M Δ_iᵀ with G = dL/dW' and M = XᵀX/(Nm), so the worst case
in the ball ‖Δ‖_F ≤ r is a trust-region problem with a closed form up to one scalar: the maximiser
is Δ_i = ½ (λI − M)⁻¹ G_iᵀ with λ > λ_max(M) chosen so that ‖Δ‖_F = r (found by bisection on the
eigen-decomposition of M, independently of the attack).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bilora import adapters
from bilora.sharpness import ball
from bilora.sharpness.config import SharpnessConfig
from bilora.sharpness.measure import measure
from bilora.sharpness.result import SharpnessResult
from tests.test_sharpness import assert_same, factors, quad_delta, quad_grad, quadratic, state

P = adapters.PRIMARY


def worst_case(layer, x, y, radius: float) -> tuple[float, torch.Tensor]:
    """max_{‖Δ‖_F ≤ r} L(W' + Δ) − L(W') and its maximiser, by the trust-region secular equation."""
    g = quad_grad(layer, x, y)  # (out, in)
    m = x.T @ x / (x.shape[0] * g.shape[0])  # (in, in): the quadratic term per output row
    lam_j, q = torch.linalg.eigh(m)  # ascending eigenvalues, orthonormal columns
    gq = g @ q  # (out, in): G in M's eigenbasis

    def norm_at(lam: float) -> float:  # ‖Δ(λ)‖_F, decreasing in λ > λ_max
        return float((0.5 * gq / (lam - lam_j)).pow(2).sum().sqrt())

    lo, hi = float(lam_j[-1]) + 1e-15, float(lam_j[-1]) + 1.0
    while norm_at(hi) > radius:
        hi = 2 * hi - float(lam_j[-1])
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm_at(mid) > radius else (lo, mid)
    delta = (0.5 * gq / (hi - lam_j)) @ q.T  # (out, in)
    return quad_delta(layer, x, y, delta), delta


def test_projected_attack_finds_the_known_worst_case_of_a_quadratic():
    model, layer, objective, x, y = quadratic()
    before = state(model)
    radii = (0.3, 3.0)
    res = ball.ball_sharpness(model, objective, "full", radii, steps=300, restarts=2, step_size=0.1, n_directions=3, seed=7)
    assert_same(before, state(model))
    g = quad_grad(layer, x, y)
    assert res["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    for point, r in zip(res["radii"], radii):
        worst, delta = worst_case(layer, x, y, r)
        assert float(delta.norm()) == pytest.approx(r, rel=1e-9)
        one = quad_delta(layer, x, y, r * g / g.norm())
        assert point["one_step"] == pytest.approx(one, rel=1e-12)  # float64 losses, observed ≤ 1e-15
        # the projected attack reaches the worst case and cannot exceed it: after 300 steps of 0.1·r both restarts
        # agree with the secular-equation solution to ≤ 2e-15 relative at r = 0.3 and r = 3 (after 100 steps: 5e-10
        # and 7e-7); rel 1e-10 allows for the float64 bisection
        assert point["pgd"] == pytest.approx(worst, rel=1e-10)
        assert point["pgd"] <= worst * (1 + 1e-12)
        assert all(v <= worst * (1 + 1e-12) for v in point["pgd_restarts"]) and len(point["pgd_restarts"]) == 2
        assert point["pgd"] >= point["one_step"]
        # random directions of global norm r, antithetic: ½[Δ(ru) + Δ(−ru)] is exactly the curvature term ‖X(ru)ᵀ‖²/(Nm)
        # of the quadratic (the first-order term cancels), recomputed by hand from the same seeded draws
        us = [ball.unit_random(model, "full", 7, k)[0] for k in range(3)]
        rnd = [float((x @ (r * u).T).pow(2).sum()) / (x.shape[0] * u.shape[0]) for u in us]
        assert point["random"]["values"] == pytest.approx(rnd, rel=1e-9)  # a difference of losses ~1: abs error ~1e-15
        assert rnd == pytest.approx([0.5 * (quad_delta(layer, x, y, r * u) + quad_delta(layer, x, y, -r * u)) for u in us], rel=1e-9)
        assert point["random"]["mean"] == pytest.approx(sum(rnd) / 3, rel=1e-9)
        assert all(v > 0 for v in rnd) and max(rnd) < point["one_step"]
    # at the large radius the curvature term matters and the one-step point is measurably below the worst case
    assert res["radii"][1]["one_step"] < 0.99 * res["radii"][1]["pgd"]
    # one step of PGD from the one-step start cannot do worse than the one-step attack
    short = ball.ball_sharpness(model, objective, "full", (3.0,), steps=1)
    assert short["radii"][0]["pgd"] >= short["radii"][0]["one_step"]


def test_unit_random_directions_have_global_norm_one_and_are_seeded():
    model, *_ = quadratic()
    for space in ("full", "lora"):
        u = ball.unit_random(model, space, 3, 0)
        assert math.fsum(float(p.double().pow(2).sum()) for p in u) == pytest.approx(1.0, rel=1e-12)
        assert all(torch.equal(a, b) for a, b in zip(u, ball.unit_random(model, space, 3, 0)))
        assert not torch.equal(u[0], ball.unit_random(model, space, 3, 1)[0])


def test_lora_space_attack_and_random_match_explicit_factors():
    model, layer, objective, x, y = quadratic()
    res = ball.ball_sharpness(model, objective, "lora", (0.2,), steps=20, restarts=1, n_directions=2, seed=1)
    a, b, s = factors(layer)
    w0 = layer.get_base_layer().weight.detach().double()

    def increase(da, db):
        w = w0 + s * (b + db) @ (a + da)
        return quad_delta(layer, x, y, w - w0 - s * b @ a)

    for k in range(2):
        ua, ub = ball.unit_random(model, "lora", 1, k)
        want = 0.5 * (increase(0.2 * ua, 0.2 * ub) + increase(-0.2 * ua, -0.2 * ub))  # antithetic pair
        assert res["radii"][0]["random"]["values"][k] == pytest.approx(want, rel=1e-9)
    # the one-step point from the analytic factor gradients dL/dA = s·BᵀG, dL/dB = s·G·Aᵀ (G = dL/dW')
    g = quad_grad(layer, x, y)
    ga, gb = s * b.T @ g, s * g @ a.T
    norm = float((ga.pow(2).sum() + gb.pow(2).sum()).sqrt())
    assert res["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert res["radii"][0]["one_step"] == pytest.approx(increase(0.2 * ga / norm, 0.2 * gb / norm), rel=1e-12)
    assert res["radii"][0]["pgd"] >= res["radii"][0]["one_step"] > max(res["radii"][0]["random"]["values"])
    before = state(model)
    ball.ball_sharpness(model, objective, "lora", (0.2,), steps=3, n_directions=1)
    assert_same(before, state(model))  # the factors are restored bit for bit


def test_measure_reports_the_ball_and_its_headline_round_trips():
    model, layer, objective, x, y = quadratic()
    cfg = SharpnessConfig(
        spaces=("full",),
        radii=(),
        n_directions=0,
        attack_alphas=(),
        curve_points=0,
        ball_radii=(0.05, 0.5),
        ball_steps=3,
        ball_directions=2,
    )
    result = measure(model, objective, cfg)
    d = result.to_dict()
    ball_part = d["spaces"]["full"]["ball"]
    assert [p["radius"] for p in ball_part["radii"]] == [0.05, 0.5] and ball_part["steps"] == 3
    assert d["spaces"]["full"]["cost"]["grad_passes"] == 1 + 2 * 3  # the gradient at θ, then 3 per radius
    assert json.dumps(SharpnessResult.from_dict(json.loads(json.dumps(d))).to_dict()) == json.dumps(d)
    head = result.headline("accuracy")
    assert head == {
        f"full.ball.r{t}.{k}": ball_part["radii"][i][k] if k != "random" else ball_part["radii"][i]["random"]["mean"]
        for i, t in enumerate(("0.05", "0.5"))
        for k in ("pgd", "one_step", "random")
    }
    # without ball radii nothing changes: no "ball" key, no ball headline
    plain = measure(model, objective, dataclasses.replace(cfg, ball_radii=(), radii=(0.01,), n_directions=1)).to_dict()
    assert "ball" not in plain["spaces"]["full"] and "ball_s" not in plain["spaces"]["full"]["cost"]
