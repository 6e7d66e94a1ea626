"""How far people agree with each other, and how far an LLM judge agrees with them.

The unit of comparison is one pair of candidates of one item: each rater says the first is better ("A"), the
second is better ("B"), or they tie ("tie"); a pair left unordered (the middle of a best/worst pick) says
nothing. Cohen's kappa (scikit-learn) for every two raters on the pairs both labelled; Fleiss' kappa
(own code: the form for a varying number of raters per unit) over all annotators; and the judge — a
judged file (generate-data preference rows, or candidates with scores) or the labels already in the task
file — against each annotator and against the annotators' majority.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.annotate.db import AnnotationDB
from toolkit.errors import UserError

LABELS = ("A", "B", "tie")
Unit = tuple[str, int, int]  # (item id, candidate a, candidate b) with a < b


def pair_labels(tiers: list[list[int]], unordered: int | None = None) -> dict[tuple[int, int], str]:
    """Every candidate pair (a < b) a ranking says something about, with "A" / "B" / "tie"."""
    tier_of = {i: t for t, tier in enumerate(tiers) for i in tier}
    out = {}
    for a in sorted(tier_of):
        for b in sorted(tier_of):
            if a >= b:
                continue
            ta, tb = tier_of[a], tier_of[b]
            if ta == tb:
                if ta != unordered:
                    out[(a, b)] = "tie"
            else:
                out[(a, b)] = "A" if ta < tb else "B"
    return out


def score_labels(scores: Sequence[float]) -> dict[tuple[int, int], str]:
    out = {}
    for a in range(len(scores)):
        for b in range(a + 1, len(scores)):
            out[(a, b)] = "tie" if scores[a] == scores[b] else "A" if scores[a] > scores[b] else "B"
    return out


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float:
    """Cohen's kappa through scikit-learn; NaN when it is undefined (fewer than 2 units, or no variation)."""
    from sklearn.metrics import cohen_kappa_score

    if len(x) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = cohen_kappa_score(list(x), list(y), labels=list(LABELS))
    return float(value)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a units x categories table of counts; units may have different numbers of raters
    (each needs at least 2). Equals the classic formula when every unit has the same number."""
    rows = [list(map(int, r)) for r in counts if sum(r) >= 2]
    if not rows:
        return math.nan
    p_units = [(sum(c * c for c in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows]
    p_bar = sum(p_units) / len(p_units)
    total = sum(sum(r) for r in rows)
    p_cat = [sum(r[j] for r in rows) / total for j in range(len(rows[0]))]
    p_e = sum(p * p for p in p_cat)
    if p_e >= 1.0:
        return math.nan
    return (p_bar - p_e) / (1 - p_e)


def strength(kappa: float) -> str:
    """Landis & Koch's words for a kappa."""
    if math.isnan(kappa):
        return "n/a"
    if kappa < 0:
        return "poor"
    for limit, word in ((0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial")):
        if kappa <= limit:
            return word
    return "almost perfect"


@dataclass
class Comparison:
    a: str
    b: str
    units: int
    agreement: float  # share of units with the same label
    kappa: float
    kind: str = "cohen"

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "units": self.units, "agreement": _num(self.agreement),
                "kappa": _num(self.kappa), "strength": strength(self.kappa), "kind": self.kind}


@dataclass
class AgreementReport:
    annotators: list[str]
    units: int  # pairs labelled by at least one annotator
    shared_units: int  # pairs labelled by at least two annotators
    pairwise: list[Comparison] = field(default_factory=list)
    fleiss: Comparison | None = None
    judge: list[Comparison] = field(default_factory=list)
    judge_source: str | None = None
    judge_rows: int = 0
    judge_matched: int = 0
    verdict: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"annotators": self.annotators, "units": self.units, "shared_units": self.shared_units,
                "pairwise": [c.as_dict() for c in self.pairwise],
                "fleiss": self.fleiss.as_dict() if self.fleiss else None,
                "judge": [c.as_dict() for c in self.judge], "judge_source": self.judge_source,
                "judge_rows": self.judge_rows, "judge_matched": self.judge_matched, "verdict": self.verdict}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def compare(a: str, b: str, la: dict[Unit, str], lb: dict[Unit, str]) -> Comparison:
    common = sorted(set(la) & set(lb))
    x = [la[u] for u in common]
    y = [lb[u] for u in common]
    agree = sum(p == q for p, q in zip(x, y, strict=True)) / len(common) if common else math.nan
    return Comparison(a, b, len(common), agree, cohen_kappa(x, y) if common else math.nan)


def human_labels(db: AnnotationDB) -> dict[str, dict[Unit, str]]:
    """annotator -> {unit: label} from every finished ranking."""
    out: dict[str, dict[Unit, str]] = defaultdict(dict)
    for answer in db.rankings():
        for (a, b), label in pair_labels(answer["tiers"], answer["unordered"]).items():
            out[answer["annotator"]][(answer["item_id"], a, b)] = label
    return dict(out)


def judge_labels_from_file(db: AnnotationDB, path: str | os.PathLike) -> tuple[dict[Unit, str], int, int]:
    """Judge labels from a judged file matched to items by prompt and answer texts: preference rows
    (prompt/chosen/rejected) or rows with candidates/responses and scores. Returns labels, rows, matched rows."""
    from toolkit.io import read_rows

    rows = read_rows(path)
    by_prompt: dict[str, list] = defaultdict(list)
    for item in db.items():
        by_prompt[item.prompt.strip()].append(item)
    labels: dict[Unit, str] = {}
    matched = 0
    for number, row in enumerate(rows, start=1):
        prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else row.get("instruction")
        if not isinstance(prompt, str):
            raise UserError("missing", file=str(path), line=number, field="prompt")
        found = False
        for item in by_prompt.get(prompt.strip(), []):
            index = {text: i for i, text in enumerate(item.candidates)}
            if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
                c, r = index.get(row["chosen"]), index.get(row["rejected"])
                if c is None or r is None or c == r:
                    continue
                labels[(item.id, min(c, r), max(c, r))] = "A" if c < r else "B"
                found = True
            else:
                texts = row.get("candidates", row.get("responses"))
                scores = row.get("scores")
                if isinstance(texts, list) and scores is None and all(isinstance(t, dict) for t in texts):
                    scores = [t.get("score") for t in texts]
                    texts = [t.get("text", t.get("content", t.get("response"))) for t in texts]
                if not isinstance(texts, list) or not isinstance(scores, list) or len(scores) != len(texts):
                    raise UserError("expected chosen/rejected strings, or candidates with scores", file=str(path),
                                    line=number)
                positions = [index.get(t) for t in texts]
                known = [(p, s) for p, s in zip(positions, scores, strict=True)
                         if p is not None and isinstance(s, (int, float))]
                for (pa, sa) in known:
                    for (pb, sb) in known:
                        if pa < pb:
                            labels[(item.id, pa, pb)] = "tie" if sa == sb else "A" if sa > sb else "B"
                            found = True
        matched += found
    return labels, len(rows), matched


def judge_labels_from_items(db: AnnotationDB) -> dict[Unit, str]:
    """The labels the task file itself carried (a generate-data judge's chosen/rejected, or candidate scores)."""
    labels: dict[Unit, str] = {}
    for item in db.items():
        if isinstance(item.meta.get("prior_ranking"), list):
            pairs = pair_labels(item.meta["prior_ranking"])
        elif isinstance(item.meta.get("prior_scores"), list) and all(
                isinstance(s, (int, float)) for s in item.meta["prior_scores"]):
            pairs = score_labels(item.meta["prior_scores"])
        else:
            continue
        for (a, b), label in pairs.items():
            labels[(item.id, a, b)] = label
    return labels


def majority(per_annotator: dict[str, dict[Unit, str]]) -> dict[Unit, str]:
    votes: dict[Unit, Counter] = defaultdict(Counter)
    for labels in per_annotator.values():
        for unit, label in labels.items():
            votes[unit][label] += 1
    out = {}
    for unit, counter in votes.items():
        (top, n), *rest = counter.most_common()
        if not rest or rest[0][1] < n:
            out[unit] = top
    return out


def agreement(db_path: str | os.PathLike, judge_file: str | os.PathLike | None = None,
              use_task_labels: bool = True) -> AgreementReport:
    with AnnotationDB(db_path, readonly=True) as db:
        people = human_labels(db)
        if judge_file:
            judge, judge_rows, judge_matched = judge_labels_from_file(db, judge_file)
            source = os.path.basename(str(judge_file))
        elif use_task_labels:
            judge = judge_labels_from_items(db)
            judge_rows = judge_matched = len({u[0] for u in judge})
            source = "labels in the task file" if judge else None
        else:
            judge, judge_rows, judge_matched, source = {}, 0, 0, None
    names = sorted(people)
    raters: Counter = Counter()
    for labels in people.values():
        raters.update(labels.keys())
    report = AgreementReport(annotators=names, units=len(raters),
                             shared_units=sum(1 for n in raters.values() if n >= 2),
                             judge_source=source, judge_rows=judge_rows, judge_matched=judge_matched)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            report.pairwise.append(compare(a, b, people[a], people[b]))
    if len(names) >= 2:
        counts = []
        agree_units = 0
        for unit, n in raters.items():
            if n < 2:
                continue
            labels = Counter(people[name][unit] for name in names if unit in people[name])
            counts.append([labels[c] for c in LABELS])
            agree_units += len(labels) == 1
        kappa = fleiss_kappa(counts) if counts else math.nan
        report.fleiss = Comparison("all annotators", f"{len(names)} raters", len(counts),
                                   agree_units / len(counts) if counts else math.nan, kappa, "fleiss")
    if judge:
        for name in names:
            report.judge.append(compare("judge", name, judge, people[name]))
        if len(names) >= 2:
            report.judge.append(compare("judge", "majority of people", judge, majority(people)))
    report.verdict = verdict(report)
    return report


def verdict(report: AgreementReport) -> str:
    people = [c.kappa for c in report.pairwise if c.units and not math.isnan(c.kappa)]
    judged = [c for c in report.judge if c.units]
    if not judged:
        if not people:
            return "not enough overlapping answers yet: show items to 2+ annotators (--per-item 2)"
        return f"people agree with each other {strength(_mean(people))}ly (mean Cohen's kappa {_mean(people):.2f})"
    best = next((c for c in judged if c.b == "majority of people"), None) or judged[0]
    judge_k = _mean([c.kappa for c in judged if c.b != "majority of people" and not math.isnan(c.kappa)]
                    or [best.kappa])
    if math.isnan(judge_k):
        return (f"judge vs people: {best.agreement:.0%} raw agreement on {best.units} pairs; kappa undefined "
                "(too few or uniform labels)")
    if not people:
        return (f"the judge agrees with people {strength(judge_k)}ly (kappa {judge_k:.2f}, {best.agreement:.0%} raw); "
                "no two people labelled the same items, so there is no human baseline")
    human_k = _mean(people)
    if judge_k >= human_k - 0.05:
        return (f"the judge agrees with people (kappa {judge_k:.2f}) about as well as people agree with each other "
                f"({human_k:.2f}): its labels can stand in for them on data like this")
    return (f"the judge agrees with people (kappa {judge_k:.2f}) less than people agree with each other "
            f"({human_k:.2f}): keep people in the loop, or improve the judge's rubric")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def plot(report: AgreementReport, path: str | os.PathLike) -> None:
    """Heatmap of Cohen's kappa between every two raters (annotators and the judge), with raw agreement
    and pair counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    raters = list(report.annotators) + (["judge"] if report.judge else [])
    n = len(raters)
    kappa = np.full((n, n), np.nan)
    text = [["" for _ in range(n)] for _ in range(n)]
    for i in range(n):
        text[i][i] = "—"  # the diagonal stays grey
    for c in report.pairwise + [j for j in report.judge if j.b in raters]:
        i, j = raters.index(c.a), raters.index(c.b)
        value = np.nan if math.isnan(c.kappa) else c.kappa
        kappa[i, j] = kappa[j, i] = value
        cell = (f"κ {c.kappa:.2f}" if not math.isnan(c.kappa) else "κ n/a") + (
            f"\n{c.agreement:.0%} of {c.units}" if c.units else "\nno overlap")
        text[i][j] = text[j][i] = cell
    size = max(4.0, 1.3 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(kappa), cmap=cmap, vmin=-0.2, vmax=1.0)
    ax.set_xticks(range(n), raters, rotation=30, ha="right")
    ax.set_yticks(range(n), raters)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="Cohen's kappa", shrink=0.8)
    title = "Agreement on candidate pairs"
    if report.fleiss and not math.isnan(report.fleiss.kappa):
        title += f"\nFleiss' kappa (people) {report.fleiss.kappa:.2f} on {report.fleiss.units} pairs"
    majority_row = next((c for c in report.judge if c.b == "majority of people"), None)
    if majority_row and majority_row.units:
        k = "n/a" if math.isnan(majority_row.kappa) else f"{majority_row.kappa:.2f}"
        title += f"\njudge vs majority: κ {k}, {majority_row.agreement:.0%} of {majority_row.units}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
