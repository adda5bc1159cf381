"""Textbook optimizer rules and 8-bit block-wise decoding, written from the papers.

Independent oracles for tests/test_oracles.py: this module imports nothing
from dist8bit, and each rule is written the way its paper states it (in
float64, one tensor at a time, pure functions), not the way dist8bit's
kernels factor it. A mistake in dist8bit's update rules, constants or
kernels therefore cannot reappear here by construction.

Every rule is a frozen dataclass with `init_state(p)` and
`step(p, g, state, t) -> (p_new, state_new)` for step t = 1, 2, ...;
`dataclasses.replace` builds the deliberately wrong variants the tests use
to prove that a comparison can fail. State names are torch's (`exp_avg`,
`exp_avg_sq`) plus `exp_avg_slow` for AdEMAMix's slow EMA.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


def _bias_corrections(beta1: float, beta2: float, t: int, enabled: bool) -> tuple[float, float]:
    """1 - beta^t for both moments (Kingma & Ba 2015, Algorithm 1), or 1 when disabled."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**t, 1.0 - beta2**t


def _adam_state(p: torch.Tensor) -> State:
    return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _adam_direction(
    rule: Adam | LAMB, p: torch.Tensor, g: torch.Tensor, state: State, t: int, decoupled: bool
) -> tuple[torch.Tensor, State]:
    """Adam's moments and its direction m_hat / (sqrt(v_hat) + eps) (Kingma & Ba 2015, Algorithm 1), with
    weight decay as L2 on g, or (decoupled) added to the direction as AdamW and LAMB do."""
    if not decoupled:
        g = g + rule.weight_decay * p
    m = rule.beta1 * state["exp_avg"] + (1 - rule.beta1) * g
    v = rule.beta2 * state["exp_avg_sq"] + (1 - rule.beta2) * g * g
    bc1, bc2 = _bias_corrections(rule.beta1, rule.beta2, t, rule.bias_correction)
    direction = (m / bc1) / ((v / bc2).sqrt() + rule.eps)
    if decoupled:
        direction = direction + rule.weight_decay * p
    return direction, {"exp_avg": m, "exp_avg_sq": v}


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba 2015) with L2 weight decay, or AdamW (Loshchilov & Hutter 2019).

    L2:        g <- g + wd p, then Adam on g.
    decoupled: p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)   (lr scales wd, as torch.optim.AdamW).
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    bias_correction: bool = True

    def init_state(self, p: torch.Tensor) -> State:
        return _adam_state(p)

    def step(self, p: torch.Tensor, g: torch.Tensor, state: State, t: int) -> tuple[torch.Tensor, State]:
        update, state = _adam_direction(self, p, g, state, t, self.decoupled)
        return p - self.lr * update, state


@dataclass(frozen=True)
class Lion:
    """Lion (Chen et al. 2023, Algorithm 2).

    c = beta1 m + (1 - beta1) g ;  p <- p - lr (sign(c) + wd p) ;  m <- beta2 m + (1 - beta2) g
    """

    lr: float
    beta1: float
    beta2: float
    weight_decay: float

    def init_state(self, p: torch.Tensor) -> State:
        return {"exp_avg": torch.zeros_like(p)}

    def step(self, p: torch.Tensor, g: torch.Tensor, state: State, t: int) -> tuple[torch.Tensor, State]:
        m = state["exp_avg"]
        interpolated = self.beta1 * m + (1 - self.beta1) * g
        p_new = p - self.lr * (torch.sign(interpolated) + self.weight_decay * p)
        return p_new, {"exp_avg": self.beta2 * m + (1 - self.beta2) * g}


@dataclass(frozen=True)
class LARS:
    """LARS (You et al. 2017, Algorithm 1), per parameter tensor (one layer each).

    local = eta ||p|| / (||g|| + wd ||p||)   (1 where ||p|| or ||g|| is 0, dist8bit's convention)
    v <- m v + lr local (g + wd p) ;  p <- p - v          (v starts at 0)
    trust_in_momentum=False: v <- m v + (g + wd p) ;  p <- p - lr local v
    (dist8bit's trust_ratio_in="step", which the paper does not have).
    """

    lr: float
    momentum: float
    weight_decay: float
    trust_coefficient: float
    trust_in_momentum: bool = True

    def init_state(self, p: torch.Tensor) -> State:
        return {"momentum_buffer": torch.zeros_like(p)}

    def step(self, p: torch.Tensor, g: torch.Tensor, state: State, t: int) -> tuple[torch.Tensor, State]:
        p_norm, g_norm = p.norm().item(), g.norm().item()
        local = 1.0
        if p_norm > 0 and g_norm > 0:
            local = self.trust_coefficient * p_norm / (g_norm + self.weight_decay * p_norm)
        u = g + self.weight_decay * p
        if self.trust_in_momentum:
            v = self.momentum * state["momentum_buffer"] + self.lr * local * u
            return p - v, {"momentum_buffer": v}
        v = self.momentum * state["momentum_buffer"] + u
        return p - self.lr * local * v, {"momentum_buffer": v}


@dataclass(frozen=True)
class LAMB:
    """LAMB (You et al. 2019, Algorithm 2), per parameter tensor (one layer each).

    adam_w_mode=True:  r = m_hat / (sqrt(v_hat) + eps) + wd p   (the paper)
    adam_w_mode=False: g <- g + wd p first (L2), r = m_hat / (sqrt(v_hat) + eps)
    p <- p - lr * phi(||p|| / ||r||) * r, with phi(x) = clamp(x, min_coeff, max_coeff)
    and the ratio taken as 1 when ||p|| or ||r|| is 0 (DeepSpeed FusedLamb's rule).

    min_coeff / max_coeff: the paper's phi. Identity by default; DeepSpeed
    FusedLamb clamps to [0.01, 10]; min_coeff = max_coeff = 1 drops the trust
    ratio (bitsandbytes 0.50's LAMB). max_unorm > 0: bitsandbytes' update-norm
    clip, ||phi * r|| <= max_unorm * ||p|| (so a zero parameter does not move).
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    adam_w_mode: bool = True
    bias_correction: bool = True
    min_coeff: float = 0.0
    max_coeff: float = math.inf
    max_unorm: float = 0.0
    zero_norm_ratio: float = 1.0  # the ratio where ||p|| or ||r|| is 0

    def init_state(self, p: torch.Tensor) -> State:
        return _adam_state(p)

    def step(self, p: torch.Tensor, g: torch.Tensor, state: State, t: int) -> tuple[torch.Tensor, State]:
        r, state = _adam_direction(self, p, g, state, t, self.adam_w_mode)
        p_norm, r_norm = p.norm().item(), r.norm().item()
        ratio = p_norm / r_norm if p_norm > 0 and r_norm > 0 else self.zero_norm_ratio
        ratio = min(max(ratio, self.min_coeff), self.max_coeff)
        update = ratio * r
        if self.max_unorm > 0:
            limit = self.max_unorm * p_norm
            update_norm = update.norm().item()
            if update_norm > limit:
                update = update * (limit / update_norm)
        return p - self.lr * update, state


def half_life(beta: float) -> float:
    """Steps for an EMA with factor beta to halve a contribution: beta ** half_life = 1/2."""
    return math.log(0.5) / math.log(beta)


@dataclass(frozen=True)
class AdEMAMix:
    """AdEMAMix (Pagliardini et al. 2024, Algorithm 1).

    m1 <- b1 m1 + (1-b1) g ;  m2 <- b3(t) m2 + (1-b3(t)) g ;  v <- b2 v + (1-b2) g^2
    p  <- p - lr ((m1 / bc1 + alpha(t) m2) / (sqrt(v / bc2) + eps) + wd p)

    Warm-ups (section 3 of the paper): alpha(t) = min(t alpha / T_alpha, alpha);
    b3(t) interpolates the *half-life* of the EMA linearly from b1's to b3's over
    T_b3 steps and stays at b3 after (b3(t) = min(that, b3)). No warm-up when
    T is None.
    """

    lr: float
    beta1: float
    beta2: float
    beta3: float
    alpha: float
    eps: float
    weight_decay: float
    t_alpha: int | None = None
    t_beta3: int | None = None

    def alpha_at(self, t: int) -> float:
        if self.t_alpha is None:
            return self.alpha
        return min(t * self.alpha / self.t_alpha, self.alpha)

    def beta3_at(self, t: int) -> float:
        if self.t_beta3 is None:
            return self.beta3
        fraction = t / self.t_beta3
        steps = (1 - fraction) * half_life(self.beta1) + fraction * half_life(self.beta3)
        return min(0.5 ** (1 / steps), self.beta3)

    def init_state(self, p: torch.Tensor) -> State:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_slow": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def step(self, p: torch.Tensor, g: torch.Tensor, state: State, t: int) -> tuple[torch.Tensor, State]:
        beta3 = self.beta3_at(t)
        m1 = self.beta1 * state["exp_avg"] + (1 - self.beta1) * g
        m2 = beta3 * state["exp_avg_slow"] + (1 - beta3) * g
        v = self.beta2 * state["exp_avg_sq"] + (1 - self.beta2) * g * g
        bc1, bc2 = _bias_corrections(self.beta1, self.beta2, t, True)
        update = (m1 / bc1 + self.alpha_at(t) * m2) / ((v / bc2).sqrt() + self.eps) + self.weight_decay * p
        return p - self.lr * update, {"exp_avg": m1, "exp_avg_slow": m2, "exp_avg_sq": v}


# ------------------------------------------------------------------ 8-bit states
@functools.cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values of the 8-bit dynamic tree map (Dettmers 2015), float64, sorted.

    A code is [sign] [k zeros] [1] [fraction bits]: k picks the decade 10^-k
    (k = 0..6) and the fraction bits pick one of 2^b equal sub-intervals of
    [0.1, 1] (its midpoint), b being whatever bits remain. The unsigned map
    spends the sign bit on one more fraction bit. Plus the values 0 and 1.
    Cached: callers must not modify the tensor.
    """
    magnitude_bits = 7 if signed else 8
    values = [0.0, 1.0]
    for k in range(7):
        items = 2 ** (magnitude_bits - 1 - k)
        width = 0.9 / items
        for j in range(items):
            value = 10.0**-k * (0.1 + (j + 0.5) * width)
            values += [value, -value] if signed else [value]
    return torch.tensor(sorted(values), dtype=torch.float64)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """value = map[code] * absmax of its block (blocks of `blocksize` consecutive elements)."""
    flat = codes.reshape(-1).long()
    scales = absmax.double().repeat_interleave(blocksize)[: flat.numel()]
    return (code_map.to(codes.device)[flat] * scales).reshape(codes.shape)


def nearest_code_error(values: torch.Tensor, code_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per element, |value - nearest representable value| when each block is scaled by its absmax.

    The least error any round-to-nearest block-wise quantizer can reach, and
    the one it must reach: a stored 8-bit state may be off by no more.
    """
    flat = values.double().reshape(-1)
    padded = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % blocksize))
    absmax = padded.view(-1, blocksize).amax(dim=1).repeat_interleave(blocksize)[: flat.numel()]
    scaled = torch.where(absmax > 0, flat / absmax, torch.zeros_like(flat))
    code_map = code_map.to(flat.device)
    above = torch.searchsorted(code_map, scaled).clamp(max=code_map.numel() - 1)
    below = (above - 1).clamp(min=0)
    distance = torch.minimum((scaled - code_map[above]).abs(), (scaled - code_map[below]).abs())
    return (distance * absmax).reshape(values.shape)
