"""Markdown tables of the classifier ablation (``benchmarks/classifier_ablation.py``).

    python tools/classifier_table.py docs/results/classifier-ablation-2026-12-02.json

Mean and standard deviation over seeds for trained variants; ensembles and the shipped default
are single models. Test columns were never used for selection; ``val AUROC`` is what selected
each checkpoint (for two sources, the mean of the sources' validation AUROCs).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _fmt(values: list[Any], digits: int = 3) -> str:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _view(e: dict[str, Any], view: str) -> tuple[Any, Any]:
    v = _get(e, "classification", "by_view", "views", view) or {}
    return v.get("auroc"), v.get("n")


def rows(results: dict[str, Any]) -> list[tuple[str, dict[str, list[Any]]]]:
    groups: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    names = sorted({k.split("|")[0] for k in results["evals"]})
    for name in names:
        variant = name.rsplit("-s", 1)[0] if name[-1].isdigit() and "-s" in name else name
        g = groups[variant]
        r = results["evals"].get(f"{name}|rsna_test", {})
        k = results["evals"].get(f"{name}|kermany_test", {})
        c = r.get("classification", {})
        g["auroc"].append(c.get("auroc"))
        g["auprc"].append(c.get("auprc"))
        g["sens"].append(c.get("sensitivity"))
        g["spec"].append(c.get("specificity"))
        g["ece"].append(c.get("ece"))
        g["ece_raw"].append(c.get("ece_uncalibrated"))
        ap, n_ap = _view(r, "AP")
        pa, n_pa = _view(r, "PA")
        g["ap"].append(ap)
        g["pa"].append(pa)
        g["n_ap"].append(n_ap)
        g["n_pa"].append(n_pa)
        g["view_pred"].append(_get(c, "by_view", "view_predictability_auroc"))
        g["pointing"].append(_get(r, "localisation", "pointing_game"))
        g["rsna_map"].append(_get(r, "localisation", "rsna_map"))
        g["kermany_patient"].append(_get(k, "classification", "patient_level", "auroc"))
        g["kermany_image"].append(_get(k, "classification", "auroc"))
        val = _get(results.get("runs", {}), name, "val") or {}
        g["val"].append(val.get("auroc"))
        sources = val.get("sources") or {}
        g["val_rsna"].append(
            _get(sources, "rsna-pneumonia-sample", "auroc") if sources else val.get("auroc")
        )
        kval = results["evals"].get(f"{name}|kermany_val", {})
        g["val_kermany"].append(
            _get(sources, "kermany-pediatric/train", "auroc")
            or _get(kval, "classification", "auroc")
        )
        g["n"].append(1)
    order = ["shipped-default", "scratch", "imagenet", "imagenet+kermany", "imagenet+unlabelled"]
    return sorted(
        groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    print(
        "| variant | seeds | val AUROC (selection) | RSNA val AUROC | Kermany val AUROC | "
        "RSNA test AUROC | AUPRC | sens / spec "
        "at stored threshold | ECE (before calibration) | Kermany patient AUROC | "
        "Kermany image AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    table = rows(results)
    for variant, g in table:
        print(
            f"| {variant} | {len(g['n'])} | {_fmt(g['val'])} | {_fmt(g['val_rsna'])} | "
            f"{_fmt(g['val_kermany'])} | {_fmt(g['auroc'])} | "
            f"{_fmt(g['auprc'])} | {_fmt(g['sens'], 2)} / {_fmt(g['spec'], 2)} | "
            f"{_fmt(g['ece'])} ({_fmt(g['ece_raw'])}) | {_fmt(g['kermany_patient'])} | "
            f"{_fmt(g['kermany_image'])} |"
        )
    print()
    print(
        "| variant | AUROC within AP (n) | AUROC within PA (n) | view predicted by the "
        "probability (AUROC) | pointing game | RSNA metric |"
    )
    print("|---|---|---|---|---|---|")
    for variant, g in table:
        n_ap = next((n for n in g["n_ap"] if n), "?")
        n_pa = next((n for n in g["n_pa"] if n), "?")
        print(
            f"| {variant} | {_fmt(g['ap'])} ({n_ap}) | {_fmt(g['pa'])} ({n_pa}) | "
            f"{_fmt(g['view_pred'])} | {_fmt(g['pointing'])} | {_fmt(g['rsna_map'])} |"
        )


if __name__ == "__main__":
    main()
