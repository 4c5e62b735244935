"""The verdict of ``gradfix check``: a pure function of the measured statistics.

Kept apart from the measurement (:mod:`gradfix.jobs.check`) so that any job can state the same
verdict from the same numbers (:func:`decide`). The rules and their thresholds are the constants
below; the reasoning is in :func:`decide`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

VerdictCode = Literal["transfers", "weak", "permutation", "nothing-transfers"]

Z_INTERVAL = 1.96
"""Half-width of the agreement's interval and of the chance band, in standard deviations
(two-sided 95 % under normality)."""
Z_CLEAR = 3.0
"""*Clearly* above chance: the agreement lies at least this many standard deviations of the null
above the null's mean (a one-sided permutation test at about 0.1 %)."""
Z_NULL = 2.0
"""*Indistinguishable* from chance: less than this many standard deviations of the null above it."""
MIN_EXCESS = 0.01
"""The least excess of agreement over chance (one percentage point) that counts as carrying
something: on a model of many millions of coordinates a smaller excess can be many standard
deviations of the null and still move little. Measured on the MiniLM releases (headlines, k = 1,
2, 5, seeds 0–2): the short and long releases, where naive addition closes 90 % and 97 % of the
gap, agree at 51.5–55.0 % (excess ≥ 1.4 points); the far release, where it closes well under half,
at 50.3–50.8 % (excess ≤ 0.8 point, yet z = 8–17). Half a point, the earlier threshold, called the
far release's agreement at k ≥ 2 ``transfers``."""

STRONG_EXCESS = 0.02
"""Re-basin is not tried (``--rebasin auto``) when ``τ_A`` agrees clearly *and* by at least this
much above chance (two percentage points). A clear but small excess is what a permuted release
leaves: its residual stream still lines up with A's while its heads and units do not (measured on
the permuted MiniLM release: 50.7 % against a chance of 50.0 %, 54.0 % after re-basin; the continued
release it was made from: 54.0 % directly)."""

FINE_TUNE_B = "fine-tune B"
"""The recommendation when nothing transfers: no transport method, fine-tune B on the task."""


@dataclass(frozen=True)
class Agreement:
    """One sign agreement against the null: its estimate, the shots' spread and the null's."""

    estimate: float
    se: float
    """Standard deviation of the agreement over bootstrap resamples of the shots."""
    chance: float
    """Mean agreement of the null (``τ_A``'s rows and columns permuted within tensors)."""
    chance_sd: float
    """Standard deviation of the null agreements."""

    @property
    def excess(self) -> float:
        """Agreement above chance."""
        return self.estimate - self.chance

    @property
    def low(self) -> float:
        """Lower end of the agreement's interval (the shots' spread)."""
        return self.estimate - Z_INTERVAL * self.se

    @property
    def high(self) -> float:
        """Upper end of the agreement's interval."""
        return self.estimate + Z_INTERVAL * self.se

    @property
    def band(self) -> tuple[float, float]:
        """The chance band: the null's mean ± ``Z_INTERVAL`` standard deviations."""
        return self.chance - Z_INTERVAL * self.chance_sd, self.chance + Z_INTERVAL * self.chance_sd

    @property
    def z(self) -> float:
        """Excess in standard deviations of the null (``±inf`` when the null has no spread)."""
        if self.chance_sd > 0:
            return self.excess / self.chance_sd
        return math.copysign(math.inf, self.excess) if self.excess else 0.0

    @property
    def clear(self) -> bool:
        """Clearly above chance: ``z ≥ Z_CLEAR``, an excess of at least ``MIN_EXCESS``, and the
        interval's lower end above the null's mean (another draw of shots keeps it above chance)."""
        return self.z >= Z_CLEAR and self.excess >= MIN_EXCESS and self.low > self.chance

    @property
    def strong(self) -> bool:
        """Clearly above chance by at least ``STRONG_EXCESS``: re-basin need not be tried."""
        return self.clear and self.excess >= STRONG_EXCESS

    @property
    def indistinguishable(self) -> bool:
        """Within the noise of chance: ``z < Z_NULL``."""
        return self.z < Z_NULL


@dataclass(frozen=True)
class CheckStatistics:
    """What the verdict reads: the agreement of ``τ_A`` (and of ``τ_A`` after re-basin, when
    tried) with the target's votes, and the first-order loss change of naive addition."""

    direct: Agreement
    naive_inner: float
    """``⟨ḡ, τ_A⟩`` on the shots (α = 1): negative when ``τ_A`` as a whole points downhill for B."""
    aligned: Agreement | None = None
    """The same agreement after aligning ``τ_A`` by re-basin; ``None`` when not tried."""

    @property
    def gain(self) -> float:
        """How much re-basin raised the agreement (0 when not tried)."""
        return self.aligned.estimate - self.direct.estimate if self.aligned is not None else 0.0

    @property
    def rebasin_helps(self) -> bool:
        """Re-basin makes the agreement clear, raising it by at least ``MIN_EXCESS`` and by
        ``Z_CLEAR`` standard deviations of the null (both agreements share the null: a unit
        shuffle of ``τ_A`` and of its permuted copy have the same distribution)."""
        if self.aligned is None or not self.aligned.clear or self.gain < MIN_EXCESS:
            return False
        return self.aligned.z - self.direct.z >= Z_CLEAR


@dataclass(frozen=True)
class Verdict:
    """The verdict code, the recommended method and the reason in one sentence."""

    verdict: VerdictCode
    recommended_method: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready form."""
        return {"verdict": self.verdict, "recommended_method": self.recommended_method, "reason": self.reason}


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def decide(stats: CheckStatistics) -> Verdict:
    """The verdict and the recommended method, from the statistics alone (no I/O, no model).

    Two spreads are built from the data (:mod:`gradfix.jobs.check_stats`): the *null* (what a
    task vector with τ_A's values and row/column structure but unrelated to B agrees with these
    votes by chance: τ_A's rows and columns permuted within tensors), which says whether τ_A is
    related to B's descent direction at all (``z``, a permutation test on these votes); and the
    agreement's *interval* over bootstrap resamples of the shots, which says how much another
    draw of shots would move it. Rules, in order:

    1. **permutation** (:attr:`CheckStatistics.rebasin_helps`: clear after re-basin, raised by at
       least ``MIN_EXCESS`` and by ``Z_CLEAR`` standard deviations of the null): the bases compute
       alike with their units in another order, so τ_A lands on the wrong coordinates; recommend
       ``transfusion`` (re-basin, then mask). First, because a permuted release can leave a small
       clear agreement as it is (its unpermuted residual stream): re-basin is then the better
       transport still.
    2. **transfers** (:attr:`Agreement.clear`: ``z ≥ Z_CLEAR``, at least ``MIN_EXCESS`` above
       chance, and the interval's lower end above chance): τ_A's coordinates line up with B's
       and carry information B can use, whichever shots are drawn. Recommend ``naive`` when the
       whole of τ_A is also a first-order descent direction on the shots (``⟨ḡ, τ_A⟩ < 0``:
       adding it whole lowers B's loss to first order), else ``adaptive`` (the agreeing part
       helps but the whole points uphill: let the gate keep the agreeing coordinates and α be
       chosen from the shots).
    3. **nothing-transfers** (:attr:`Agreement.indistinguishable`: ``z < Z_NULL``, and re-basin
       did not help): τ_A's signs predict B's descent direction no better than a shuffled τ_A,
       so any gain of a transport would be B's own sign-gradient step on the shots, not A's
       knowledge; recommend fine-tuning B.
    4. **weak** (in between: some agreement above chance, but not clearly): recommend
       ``adaptive``, which keeps B unchanged unless the shots show that a transport helps.

    An agreement without a spread over the shots (``se = 0``: a transport's summed votes, see
    :mod:`gradfix.jobs.check_votes`) is judged on the null alone, and its reason states no interval.
    """
    direct, aligned = stats.direct, stats.aligned
    interval = f" ({_pct(direct.low)} to {_pct(direct.high)})" if direct.se > 0 else ""
    said = (
        f"τ_A agrees with B's votes on {_pct(direct.estimate)}{interval}, "
        f"chance {_pct(direct.band[0])} to {_pct(direct.band[1])}"
    )
    if aligned is not None and stats.rebasin_helps:
        interval = f" ({_pct(aligned.low)} to {_pct(aligned.high)})" if aligned.se > 0 else ""
        why = f"after re-basin it agrees on {_pct(aligned.estimate)}{interval}"
        return Verdict("permutation", "transfusion", f"{said}; {why}: a permutation explains the gap")
    if direct.clear:
        if stats.naive_inner < 0:
            why = "and adding it whole lowers B's loss on the shots to first order"
            return Verdict("transfers", "naive", f"{said}, {why}")
        why = "but the whole of it raises B's loss on the shots to first order: keep the agreeing part"
        return Verdict("transfers", "adaptive", f"{said}, {why}")
    if direct.indistinguishable:
        tried = "" if aligned is None else ", also after re-basin"
        why = "nothing of A's fine-tune carries over; a transport would only be B's own step on the shots"
        return Verdict("nothing-transfers", FINE_TUNE_B, f"{said}{tried}: {why}")
    why = "above chance but not clearly: let the adaptive default decide from the shots"
    return Verdict("weak", "adaptive", f"{said}: {why}")
