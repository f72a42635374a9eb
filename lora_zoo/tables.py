"""What every results table shares: row and column labels, the order of dataset columns, cells, rendering, errors.

``scripts/make_table.py`` lays out the few-shot table (the NoRA paper's Table 2; Li et al., ICCV 2025) and
``scripts/protocol_tables.py`` the base-to-new, cross-dataset and domain tables (CoCoOp, Zhou et al., CVPR
2022) with these. A table is read from the runs' JSON records alone (``results``): a method's rows are named by
the display name its runs recorded (``runs.method_record``), never looked up in the method registry, so
tabulating imports neither torch, open_clip, numpy nor the methods. A row of runs whose method selected
something on the test split (``"selected_on": "test"`` in ``result.json``: Tip-Adapter-F as its authors ran it)
is marked ``[test-selected]``: its numbers are optimistic, not a protocol result.
"""
from __future__ import annotations

import csv
import statistics
from io import StringIO

from .results import MISSING

PAPER_BACKBONE = "ViT-B-16"  # the backbone of the papers' reported rows: its tables come first
FORMATS = ("md", "latex", "csv")


class TableError(ValueError):
    """A request no table can answer; printed as one line, exit code 2."""


def display_names(runs) -> dict[str, str]:
    """``{method: display name}`` as the runs recorded it (the first run read that has one); the method's own name
    where none has (records written before runs recorded their method's display name)."""
    recorded: dict[str, str] = {}
    for run in runs:
        if run.display_name:
            recorded.setdefault(run.method, run.display_name)
    return {run.method: recorded.get(run.method, run.method) for run in runs}


TEST_SELECTED = "[test-selected]"


def method_label(method: str, names: dict[str, str], test_selected: bool = False) -> str:
    """The name of a row of ours: ``NoRA (ours, nora)``, from ``display_names``; a row of runs that selected on the
    test split: ``TIP-Adapter-F (ours, tip_adapter) [test-selected]``."""
    return f"{names.get(method, method)} (ours, {method})" + (f" {TEST_SELECTED}" if test_selected else "")


def test_selected(run) -> bool:
    """Whether a run's method selected something on the test split (its record says ``"selected_on": "test"``)."""
    return getattr(run, "selected_on", None) == "test"


def dataset_label(name: str) -> str:
    """A dataset's column title (``DTD``); the name itself for a dataset this checkout does not register."""
    from datasets import get_spec, list_datasets
    return get_spec(name).display_name if name in list_datasets() else name


def column_order(requested, present: set, fixed: list, known: list, always: bool) -> list:
    """``requested`` datasets (``benchmark``: ``fixed``; ``all``: those and every other present), else ``fixed``
    (``always``) or those of it present, then the other present ones, sorted. ``TableError`` for a requested
    dataset neither ``known`` nor present."""
    if requested and requested not in (["benchmark"], ["all"]):
        unknown = [d for d in requested if d not in known and d not in present]
        if unknown:
            raise TableError(f"--datasets {unknown[0]}: no such dataset and no results for it "
                             f"(registered: {', '.join(known)}; or benchmark, all)")
        return list(requested)
    first = fixed if always or requested else [d for d in fixed if d in present]
    return first + (sorted(present - set(fixed)) if requested != ["benchmark"] else [])


def single(values):
    """The one value recorded (rounded), None when none was, ``"varies"`` when runs disagree."""
    found = {round(v, 6) for v in values if v is not None}
    return found.pop() if len(found) == 1 else ("varies" if found else None)


def number_text(value) -> str:
    """A value of ``single`` as a cell."""
    return MISSING if value is None else value if isinstance(value, str) else f"{value:.2f}"


def known_average(values: list) -> str:
    """The mean of the numbers among ``single``'s values (``[k/D datasets]`` when only k of the D are numbers)."""
    known = [v for v in values if isinstance(v, float)]
    if not known:
        return MISSING
    return f"{statistics.fmean(known):.2f}" + (f" [{len(known)}/{len(values)} datasets]" if len(known) < len(values)
                                                else "")


def render(head: list[str], rows: list[list[str]], fmt: str, groups: list[str] | None = None) -> str:
    """``rows`` (lists of cells) under ``head`` as Markdown, LaTeX or CSV. With ``groups`` (``"4-shot"``, ...) the
    columns after the first repeat ``head[1:]`` once per group: Markdown and CSV head each "<label> <group>",
    LaTeX heads each group with one spanning cell above its labels."""
    labels = head[1:]
    if groups is not None:
        head = head[:1] + [f"{name} {group}" for group in groups for name in labels]
    if fmt == "md":
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(row) + " |" for row in rows])
    if fmt == "latex":
        tex = lambda s: s.replace("±", r"$\pm$").replace("—", "--").replace("%", r"\%").replace("_", r"\_")
        top = [" & ".join(map(tex, head))] if groups is None else [
            " & ".join(head[:1] + [rf"\multicolumn{{{len(labels)}}}{{c}}{{{g}}}" for g in groups]),
            " & ".join([""] + [tex(n) for _ in groups for n in labels])]
        return "\n".join([r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}", r"\toprule",
                          *(line + r" \\" for line in top), r"\midrule",
                          *(" & ".join(map(tex, row)) + r" \\" for row in rows), r"\bottomrule", r"\end{tabular}"])
    out = StringIO()
    csv.writer(out, lineterminator="\n").writerows([head, *rows])
    return out.getvalue().rstrip("\n")


def print_table(title: str, head: list[str], rows: list[list[str]], fmt: str, groups: list[str] | None = None):
    """``title``, then the table in ``fmt`` (``all``: Markdown, LaTeX and CSV), each followed by a blank line."""
    print(title + "\n")
    for one in FORMATS if fmt == "all" else (fmt,):
        print(render(head, rows, one, groups) + "\n")
