"""Issue 19's section 3 at a glance: every ``teacher_reuse`` study (a teacher not purpose-built for
the student) and the untrained-teacher control, side by side.

  python benchmarks/teacher_reuse_summary.py     # reads benchmarks/results/study/*/, no training

Per study: the student's corpus, what its teacher was pre-trained on and for how long, that
teacher's own eval loss on the student's eval text, the speedup in steps per seed, the final loss
minus the baseline's, and where ``benchmarks/step_cost.py`` priced the study, wall-clock per seed
and pooled over seeds with the teacher's pre-training counted once and as zero. Writes
benchmarks/results/teacher_reuse.json and .png (speedup per teacher with its seeds; speedup
against the teacher's own eval loss).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import RESULTS, save_figure, write_json
from study_report import step_costs_by_study

GRIDS = ("teacher_reuse", "teacher_control")


def teacher_of(payload: dict[str, Any]) -> str:
    """What the study's teacher learnt from: a corpus and its steps, or nothing (the control)."""
    settings = payload["settings"]
    if payload["grid"] == "teacher_control":
        return "untrained (control)"
    student = settings.get("corpus_name") if settings.get("corpus") else "wikitext2"
    corpus = settings.get("teacher_corpus_name") or student
    own = " (purpose-built)" if corpus == student and settings["teacher_steps"] == 300 else ""
    return f"{corpus}, {settings['teacher_steps']} steps{own}"


def rows(study_root: Path, results: Path) -> list[dict[str, Any]]:
    """One row per configuration of every teacher_reuse / teacher_control study under ``study_root``."""
    priced = step_costs_by_study(results)
    out = []
    for path in sorted(study_root.glob("*/*.json")):
        payload = json.loads(path.read_text())
        if payload.get("kind") != "alignkit-study" or payload.get("grid") not in GRIDS:
            continue
        settings = payload["settings"]
        wall = (priced.get(payload["name"]) or (None, {}))[1].get("wall", {})
        for config, entry in payload["configs"].items():
            summary = entry["summary"]
            if not summary.get("speedup"):
                continue  # no finished pair yet
            row = {"study": payload["name"], "config": config,
                   "student_corpus": settings.get("corpus_name") if settings.get("corpus") else "wikitext2",
                   "teacher": teacher_of(payload),
                   "teacher_eval_loss": (payload.get("teacher_eval_loss") or {}).get("value"),
                   "speedup": summary["speedup"], "reached": summary["reached"], "seeds": summary["seeds"],
                   "loss_diff": summary["loss_diff"]}
            if config in wall:
                row["wall_speedup"] = wall[config]["wall_speedup"]
                row["pooled"] = wall[config].get("teacher_pretrain")
            out.append(row)
    return out


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.6 * len(table) + 3))
    order = sorted(table, key=lambda r: (r["student_corpus"], r["speedup"]["mean"]))
    colours = {c: f"C{i}" for i, c in enumerate(sorted({r["student_corpus"] for r in table}))}
    for i, row in enumerate(order):
        colour = colours[row["student_corpus"]]
        left.barh(i, row["speedup"]["mean"], color=colour, alpha=0.5)
        left.scatter(row["speedup"]["values"], [i] * len(row["speedup"]["values"]), color="black", s=14, zorder=3)
        if row.get("pooled"):
            left.scatter([row["pooled"]["counted_once"]], [i], marker="D", color="tab:red", s=30, zorder=4)
    left.axvline(1.0, color="grey", linewidth=1)
    left.set_yticks(range(len(order)), [f"{r['student_corpus']} student <- {r['teacher']}" for r in order], fontsize=8)
    left.set_xlabel("speedup in steps to the baseline's final eval loss (bar: mean, dots: seeds)")
    left.set_title("LET's recipe, 25.6M student, 5.2M teachers of several origins", fontsize=10)
    handles = [plt.Line2D([], [], marker="D", color="tab:red", linestyle="")]
    left.legend(handles, ["pooled wall-clock, the teacher's pre-training counted once"], fontsize=8, loc="lower right")
    for row in order:
        if row["teacher_eval_loss"] is None:
            continue
        values = row["speedup"]["values"]
        right.scatter([row["teacher_eval_loss"]] * len(values), values, color=colours[row["student_corpus"]], s=18)
        right.annotate(row["teacher"], (row["teacher_eval_loss"], row["speedup"]["mean"]), fontsize=7,
                       xytext=(4, 0), textcoords="offset points")
    for corpus, colour in colours.items():
        right.scatter([], [], color=colour, label=f"{corpus} student")
    right.axhline(1.0, color="grey", linewidth=1)
    right.set_xlabel("the teacher's own eval loss on the student's eval text")
    right.set_ylabel("speedup in steps (per seed)")
    right.set_title("speedup against what the teacher knows of the student's text", fontsize=10)
    right.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="folder holding study/ and the step_cost JSONs")
    args = parser.parse_args()
    results = Path(args.results)
    table = rows(results / "study", results)
    if not table:
        raise SystemExit(f"no finished teacher_reuse or teacher_control study under {results / 'study'}")
    write_json(results / "teacher_reuse.json", {"kind": "alignkit-teacher-reuse", "rows": table})
    plot(table, results / "teacher_reuse.png")
    print(f"{'student':10s} {'teacher':34s} {'own loss':>8s} {'steps':>14s} {'loss diff':>9s} {'wall':>6s} {'once':>6s}")
    for r in table:
        s = r["speedup"]
        own = "-" if r["teacher_eval_loss"] is None else f"{r['teacher_eval_loss']:.2f}"
        wall = f"{r['wall_speedup']['mean']:.2f}" if r.get("wall_speedup") else "-"
        once = f"{r['pooled']['counted_once']:.2f}" if r.get("pooled") else "-"
        print(f"{r['student_corpus']:10s} {r['teacher']:34s} {own:>8s} "
              f"{s['mean']:.2f} ± {s['std']:.2f}x {r['loss_diff']['mean']:+9.3f} {wall:>6s} {once:>6s}")


if __name__ == "__main__":
    main()
