"""Compare checkpoints side by side: one Markdown table and one bar chart per benchmark.

    python -m eval.report --results output/*/eval_*.json --table_file output/results.md

Reads the results files eval.benchmark (and eval.run_embedded) write; one row per model (SFT first,
or --order), one column per headline metric of each benchmark present. A model is its checkpoint
path (else the results file's folder) and run name; its label is its model name, or, where models
share a name (output/dpo/checkpoint-1000, output/orpo/checkpoint-1000), the shortest path ending
that tells them apart (dpo/checkpoint-1000). Of two results for one model and benchmark the later
'created' is shown and the table names the file it replaces. Rates are shown in percent.
Below the table: each benchmark's decoding, judge and dataset files, since published numbers
differ by exactly these. Figures: <figure_dir>/<benchmark>.png (matplotlib, Agg backend).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# benchmark -> [(metric key, column label, scale, better)]
HEADLINES = {
    "objhal": [("CHAIRs", "CHAIRs", 100, "↓"), ("CHAIRs_refine", "CHAIRs_refine", 100, "↓"),
               ("CHAIRi", "CHAIRi", 100, "↓"), ("obj_rec", "obj recall", 100, "↑")],
    "pope": [("f1_mean", "F1 (split mean)", 100, "↑"), ("accuracy_mean", "acc", 100, "↑"),
             ("yes_ratio_mean", "yes-ratio", 100, "")],
    "amber": [("CHAIR", "CHAIR", 100, "↓"), ("Cover", "Cover", 100, "↑"), ("Hal", "Hal", 100, "↓"),
              ("Cog", "Cog", 100, "↓"), ("F1", "F1", 100, "↑"), ("AMBER_score", "AMBER score", 100, "↑")],
    "mmhal": [("score", "score (0-6)", 1, "↑"), ("hallucination_rate", "hal. rate", 100, "↓")],
    "llava_bench": [("relative_score", "relative score", 1, "↑")],
    "embedded": [("objhal/CHAIRi", "CHAIRi", 100, "↓"), ("objhal/CHAIRs", "CHAIRs", 100, "↓"),
                 ("objhal/recall", "recall", 100, "↑"), ("pope_random/f1", "POPE-rand F1", 100, "↑"),
                 ("pope_adversarial/f1", "POPE-adv F1", 100, "↑"), ("count/accuracy", "count acc", 100, "↑")],
}
TITLES = {"objhal": "Object HalBench", "pope": "POPE", "amber": "AMBER", "mmhal": "MMHal-Bench",
          "llava_bench": "LLaVA-Bench", "embedded": "Embedded world"}
STAGE_ORDER = ("sft", "dpo", "orpo", "rm", "ppo")


def load(paths) -> list[dict]:
    out = []
    for p in paths:
        r = json.loads(Path(p).read_text(encoding="utf-8"))
        if "benchmark" not in r or "metrics" not in r:
            raise ValueError(f"{p}: not a results file of eval.benchmark (no 'benchmark' / 'metrics')")
        model = (r.get("model") or "").rstrip("/")
        r["_path"] = str(p)
        r["_model"] = os.path.normpath(model) if model else str(Path(p).resolve().parent)
        r["_name"] = r.get("model_name") or Path(r["_model"]).name
        out.append(r)
    paths_of: dict[str, set[str]] = {}
    for r in out:
        paths_of.setdefault(r["_name"], set()).add(r["_model"])
    for r in out:
        label = r["_name"]
        if len(paths_of[label]) > 1:  # one name, several models: tell them apart by their paths
            ending = _distinct_ending(r["_model"], paths_of[label])
            label = ending if Path(ending).name == label else f"{label} ({ending})"
        r["_label"] = label + (f" [{r['run_name']}]" if r.get("run_name") else "")
    return out


def _distinct_ending(path: str, paths: set[str]) -> str:
    """The shortest ending of `path` (in path parts) that no other of `paths` ends with."""
    parts = Path(path).parts
    for k in range(1, len(parts) + 1):
        if all(Path(q).parts[-k:] != parts[-k:] for q in paths if q != path):
            return "/".join(parts[-k:])
    return path


def _order(labels: list[str], order: list[str] | None) -> list[str]:
    def key(label):
        if order:
            return (order.index(label) if label in order else len(order), labels.index(label))
        base = label.split(" ")[0].lower()
        stage = next((i for i, s in enumerate(STAGE_ORDER) if base.startswith(s)), len(STAGE_ORDER))
        return (stage, labels.index(label))
    return sorted(labels, key=key)


def _grid(results: list[dict], order=None):
    """(models, benchmarks present, {(model, benchmark): record}, [(replaced, by)]); later 'created' wins."""
    cells: dict[tuple[str, str], dict] = {}
    labels: list[str] = []
    replaced = []
    for r in sorted(results, key=lambda r: r.get("created", "")):
        if (r["_label"], r["benchmark"]) in cells:
            replaced.append((cells[(r["_label"], r["benchmark"])], r))
        cells[(r["_label"], r["benchmark"])] = r
        if r["_label"] not in labels:
            labels.append(r["_label"])
    benches = [b for b in HEADLINES if any(k[1] == b for k in cells)]
    return _order(labels, order), benches, cells, replaced


def _fmt(v, scale) -> str:
    if v is None:
        return "-"
    return f"{v * scale:.1f}" if scale == 100 else f"{v * scale:.2f}"


def table(results: list[dict], order=None) -> str:
    models, benches, cells, replaced = _grid(results, order)
    cols = [(b, k, label, scale, better) for b in benches for k, label, scale, better in HEADLINES[b]]
    head = "| model | " + " | ".join(f"{TITLES[b]} {label}{' ' + better if better else ''}"
                                      for b, _, label, _, better in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for m in models:
        vals = [_fmt(cells[(m, b)]["metrics"].get(k) if (m, b) in cells else None, scale) for b, k, _, scale, _ in cols]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += ["", "Rates in percent; ↓ lower is better, ↑ higher is better. Settings:"]
    for b in benches:
        seen = []
        for m in models:
            r = cells.get((m, b))
            if r is None:
                continue
            d = r.get("decoding", {})
            dec = d.get("mode", "?") + (f", {d['num_beams']} beams" if d.get("num_beams", 1) > 1 else "") + \
                (f", max {d['max_new_tokens']} tokens" if "max_new_tokens" in d else "") + \
                (f", {d['precision']} on {d.get('device', '?')}" if "precision" in d else "")
            j = r.get("judge")
            temps = ", ".join("T=%s" % x["temperature"] for x in j["decoding"]) if j else ""
            judge = f"judge {j['model']} ({temps or 'all cached'})" if j else "no judge"
            files = r.get("dataset", {}).get("files_sha256", {})
            data = ", ".join(f"{Path(f).name}@{h[:8]}" for f, h in files.items())
            version = r.get("dataset", {}).get("version")
            nlp = r.get("details", {}).get("nlp")  # AMBER's noun finder: "rule" is not its reference's spaCy
            line = f"{dec}; {judge}; data {data}" + (f" (version {version})" if version else "") + \
                (f"; nouns by {nlp}{' (not comparable with published AMBER figures)' if nlp == 'rule' else ''}"
                 if nlp else "")
            if line not in seen:
                seen.append(line)
        lines += [f"- {TITLES[b]}: " + " | ".join(seen)]
    if replaced:
        lines += ["", "Not shown (a later run of the same model and benchmark is):"]
        lines += [f"- {old['_label']}, {TITLES[old['benchmark']]}: {old['_path']} (created {old.get('created', '?')}); "
                  f"shown: {new['_path']} (created {new.get('created', '?')})" for old, new in replaced]
    return "\n".join(lines)


def figures(results: list[dict], figure_dir: str | Path, order=None) -> list[Path]:
    from training.engine.plots import pyplot, save_figure
    plt = pyplot()

    models, benches, cells, _ = _grid(results, order)
    figure_dir = Path(figure_dir)
    figure_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for b in benches:
        heads = HEADLINES[b]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(heads) * max(1, len(models)) ** 0.5 + 2), 3.6))
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            r = cells.get((m, b))
            vals = [r["metrics"][k] * scale if r and r["metrics"].get(k) is not None else float("nan")
                    for k, _, scale, _ in heads]  # (nan: no bar, where the table shows '-')
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(heads))]
            ax.bar(xs, vals, width, label=m)
        ax.set_xticks(range(len(heads)))
        ax.set_xticklabels([f"{label} {better}".strip() for _, label, _, better in heads], fontsize=8)
        ax.set_title(TITLES[b])
        ax.set_ylabel("percent" if all(s == 100 for _, _, s, _ in heads) else "value")
        ax.legend(fontsize=8)
        out.append(save_figure(fig, figure_dir / f"{b}.png", dpi=120))
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--results", nargs="+", required=True, help="results files (eval_*.json)")
    p.add_argument("--table_file", default="", help="also write the table here")
    p.add_argument("--figure_dir", default="figure")
    p.add_argument("--order", nargs="*", default=None, help="row order by model label (default: SFT first)")
    a = p.parse_args(argv)
    results = load(sorted(set(a.results)))
    t = table(results, a.order)
    if a.table_file:
        Path(a.table_file).parent.mkdir(parents=True, exist_ok=True)
        Path(a.table_file).write_text(t + "\n")
    paths = figures(results, a.figure_dir, a.order)
    print(t)
    print("\nfigures: " + ", ".join(map(str, paths)))
    return t


if __name__ == "__main__":
    main()
