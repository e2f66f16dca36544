"""Analysis of an online experiment from its joined page logs (`homegen join`): users are the unit of
randomisation, so every figure is over users, each user's metric being their streams per page.

- Per arm: users, pages, streams per page with a 95% confidence interval; against the control arm, the
  difference with Welch's t interval and p-value (scipy).
- Sample-ratio mismatch: users per arm against the configured shares, Pearson's chi-square (scipy); a
  p-value under 0.001 says the split itself is broken and nothing else should be read.
- CUPED (Deng et al. 2013): each user's metric less theta x (their pre-experiment streams per page - its
  mean), theta = cov / var pooled over arms; users without pre-experiment pages are not adjusted.
- An always-valid sequential test: the mixture SPRT of Johari et al. (2017, "Always valid inference"),
  with a normal mixture N(0, tau^2) over the difference of means, evaluated at each look (a day) on the data so
  far; the always-valid p-value is min_k 1 / Lambda_k, so peeking every day keeps the false-positive rate at
  alpha. tau is 0.2 x the standard deviation of per-user streams per page before the experiment (or at the
  first look), fixed before the test looks at any difference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

from homegen.serving.traffic import salted_unit


@dataclasses.dataclass
class UserPanel:
    """Per user: arm, cumulative streams and pages at each look (U, K), and pre-experiment streams per page
    (NaN without pre-experiment pages)."""

    users: list[str]
    arms: np.ndarray  # (U,) arm names
    streams: np.ndarray  # (U, K) cumulative
    pages: np.ndarray  # (U, K) cumulative
    pre: np.ndarray  # (U,)

    def metric(self, look: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(users with a page by that look, their streams per page)."""
        seen = self.pages[:, look] > 0
        return seen, self.streams[seen, look] / self.pages[seen, look]


def user_panel(records: list[dict], experiment: str, look_starts: list[float]) -> UserPanel:
    """The panel of one experiment's page logs (records with `experiment` == its name); pages of the same
    users before the experiment's first page are their pre-experiment period. `look_starts`: the timestamps
    at which each look begins (the first look starts at the experiment's first page)."""
    inside = [r for r in records if r.get("experiment") == experiment and r.get("arm") is not None]
    if not inside:
        raise ValueError(f"no page log of experiment {experiment!r} (with an arm) in the logs")
    begin = min(float(r["timestamp"]) for r in inside)
    users = sorted({r["user_id"] for r in inside})
    index = {u: k for k, u in enumerate(users)}
    looks = np.asarray(sorted(look_starts) if look_starts else [begin])
    arms = np.empty(len(users), object)
    streams, pages = np.zeros((len(users), len(looks))), np.zeros((len(users), len(looks)))
    pre_streams, pre_pages = np.zeros(len(users)), np.zeros(len(users))
    for r in records:
        u = index.get(r["user_id"])
        if u is None:
            continue
        value = sum(sum(s.get("streams") or []) for s in r["page"])
        if r.get("experiment") == experiment and r.get("arm") is not None:
            if arms[u] is not None and arms[u] != r["arm"]:
                raise ValueError(f"user {r['user_id']} was served by arms {arms[u]!r} and {r['arm']!r}: the split "
                                 "is not sticky (the salt or shares changed during the experiment?)")
            arms[u] = r["arm"]
            look = max(int(np.searchsorted(looks, float(r["timestamp"]), side="right")) - 1, 0)
            streams[u, look:] += value
            pages[u, look:] += 1
        elif float(r["timestamp"]) < begin:
            pre_streams[u] += value
            pre_pages[u] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        pre = np.where(pre_pages > 0, pre_streams / np.maximum(pre_pages, 1), np.nan)
    return UserPanel(users, arms, streams, pages, pre)


def welch(a: np.ndarray, b: np.ndarray) -> dict:
    """b - a: difference of means, its standard error, 95% interval and two-sided p-value (Welch)."""
    diff = float(b.mean() - a.mean())
    var = float(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    result = stats.ttest_ind(b, a, equal_var=False)
    se = np.sqrt(var)
    return {"diff": diff, "se": float(se), "ci": (diff - 1.96 * se, diff + 1.96 * se), "p": float(result.pvalue)}


def cuped(values: np.ndarray, pre: np.ndarray) -> tuple[np.ndarray, float]:
    """(adjusted values, theta): values - theta (pre - mean pre), for users with a pre-experiment value."""
    has = ~np.isnan(pre)
    if has.sum() < 3 or np.var(pre[has]) == 0:
        return values, 0.0
    theta = float(np.cov(pre[has], values[has])[0, 1] / np.var(pre[has], ddof=1))
    adjusted = values.copy()
    adjusted[has] -= theta * (pre[has] - pre[has].mean())
    return adjusted, theta


def msprt_lambda(diff: float, var: float, tau: float) -> float:
    """The normal-mixture SPRT statistic for a difference of means estimated as `diff` with variance `var`."""
    tau2 = tau * tau
    return float(np.sqrt(var / (var + tau2)) * np.exp(tau2 * diff * diff / (2 * var * (var + tau2))))


def sequential(panel: UserPanel, control: str, arm: str, tau: float) -> dict:
    """The always-valid p-value of arm - control after each look, and the first look where it falls under
    0.05 (None if none)."""
    p, trail = 1.0, []
    for look in range(panel.pages.shape[1]):
        seen, values = panel.metric(look)
        arms = panel.arms[seen]
        a, b = values[arms == control], values[arms == arm]
        if len(a) > 1 and len(b) > 1:
            var = a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)
            if var > 0:
                p = min(p, 1.0 / msprt_lambda(float(b.mean() - a.mean()), float(var), tau))
        trail.append(p)
    first = next((k for k, value in enumerate(trail) if value < 0.05), None)
    return {"always_valid_p": trail, "first_look_under_0.05": first}


def analyse(panel: UserPanel, shares: dict[str, float], control: str, tau: float | None = None) -> dict:
    """The experiment's table (see the module's docstring)."""
    if control not in shares:
        raise ValueError(f"control arm {control!r} is not one of the experiment's arms {sorted(shares)}")
    unknown = set(panel.arms) - set(shares)
    if unknown:
        raise ValueError(f"the logs hold arms {sorted(unknown)} that the experiment file does not name")
    seen, values = panel.metric()
    arms, pre = panel.arms[seen], panel.pre[seen]
    counts = np.array([np.sum(panel.arms == a) for a in shares])
    expected = np.array([shares[a] for a in shares]) * counts.sum()
    live = expected > 0
    srm = stats.chisquare(counts[live], expected[live]) if live.sum() > 1 else None
    adjusted, theta = cuped(values, pre)
    if tau is None:
        base = panel.pre[~np.isnan(panel.pre)]
        if len(base) < 2:
            base = panel.metric(0)[1]
        tau = 0.2 * float(np.std(base, ddof=1))
    table = {"users": int(counts.sum()), "pages": int(panel.pages[:, -1].sum()), "looks": int(panel.pages.shape[1]),
             "tau": tau, "cuped_theta": theta,
             "srm": {"users": dict(zip(shares, counts.tolist())), "expected": dict(zip(shares, expected.tolist())),
                     "p": None if srm is None else float(srm.pvalue)},
             "arms": {}}
    within = [values[arms == a] - values[arms == a].mean() for a in shares if np.sum(arms == a) > 1]
    within_adjusted = [adjusted[arms == a] - adjusted[arms == a].mean() for a in shares if np.sum(arms == a) > 1]
    if within:
        table["cuped_variance_reduction"] = float(1 - np.var(np.concatenate(within_adjusted))
                                                  / np.var(np.concatenate(within)))
    base = values[arms == control]
    for arm in shares:
        mine = values[arms == arm]
        row = {"users": int(np.sum(panel.arms == arm)), "pages": int(panel.pages[panel.arms == arm, -1].sum())}
        if len(mine) > 1:
            se = float(mine.std(ddof=1) / np.sqrt(len(mine)))
            row.update(streams_per_page=float(mine.mean()), ci=(float(mine.mean() - 1.96 * se), float(mine.mean() + 1.96 * se)))
        if arm != control and len(mine) > 1 and len(base) > 1:
            row["against_control"] = welch(base, mine)
            row["against_control_cuped"] = welch(adjusted[arms == control], adjusted[arms == arm])
            row["sequential"] = sequential(panel, control, arm, tau)
        table["arms"][arm] = row
    return table


def reassigned(panel: UserPanel, salt: str, share: float = 0.5) -> UserPanel:
    """The panel with users split afresh into arms "a" and "b" by a salted hash (an A/A split of the same data)."""
    arms = np.array(["a" if salted_unit(salt, u) < share else "b" for u in panel.users], object)
    return dataclasses.replace(panel, arms=arms)


def aa_rates(panel: UserPanel, experiments: int, alpha: float = 0.05, tau: float | None = None) -> dict:
    """Over `experiments` A/A splits of the same users (each a new salt, so arm labels are independent of the
    outcomes): how often each test rejects at `alpha` (the false-positive rate), and the CUPED variance
    reduction."""
    rejections = {"welch": 0, "cuped": 0, "sequential (daily looks)": 0}
    reductions = []
    for k in range(experiments):
        table = analyse(reassigned(panel, f"aa-{k}"), {"a": 0.5, "b": 0.5}, "a", tau)
        row = table["arms"]["b"]
        rejections["welch"] += row["against_control"]["p"] < alpha
        rejections["cuped"] += row["against_control_cuped"]["p"] < alpha
        rejections["sequential (daily looks)"] += min(row["sequential"]["always_valid_p"]) < alpha
        reductions.append(table.get("cuped_variance_reduction", 0.0))
    return {"experiments": experiments, "alpha": alpha,
            "false_positive_rate": {name: count / experiments for name, count in rejections.items()},
            "cuped_variance_reduction": float(np.mean(reductions))}


def power(panel: UserPanel, control: str, arm: str, users_per_arm: int, simulations: int, alpha: float = 0.05,
          seed: int = 0, tau: float | None = None) -> dict:
    """How often each test detects arm - control at `alpha` in experiments of `users_per_arm` users per arm,
    drawn with replacement from the experiment's own users of each arm (a bootstrap of the real effect)."""
    rng = np.random.default_rng(seed)
    rows = {a: np.flatnonzero(panel.arms == a) for a in (control, arm)}
    hits = {"welch": 0, "cuped": 0, "sequential (daily looks)": 0}
    for _ in range(simulations):
        take = np.concatenate([rng.choice(rows[a], users_per_arm) for a in (control, arm)])
        sample = UserPanel([f"{panel.users[k]}#{j}" for j, k in enumerate(take)], panel.arms[take],
                           panel.streams[take], panel.pages[take], panel.pre[take])
        row = analyse(sample, {control: 0.5, arm: 0.5}, control, tau)["arms"][arm]
        hits["welch"] += row["against_control"]["p"] < alpha
        hits["cuped"] += row["against_control_cuped"]["p"] < alpha
        hits["sequential (daily looks)"] += min(row["sequential"]["always_valid_p"]) < alpha
    return {"users_per_arm": users_per_arm, "simulations": simulations,
            "power": {name: count / simulations for name, count in hits.items()}}
