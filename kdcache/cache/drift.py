"""How far a refreshed teacher's targets moved: two classification caches compared on the rows both hold (matched by
id, with the same text), per split — mean KL(old || new) at T = 1, agreement of their predictions, the rows whose
prediction changed, per class, and the rows that moved most. `kdcache drift OLD NEW` prints it and keeps it beside
the new cache (`<cache>.drift-<old fingerprint>.json`), where the report's stale-runs note finds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import heads
from ..fingerprint import diff_fields
from ..metrics import log_softmax
from .format import CacheFormatError
from .reader import open_manifest, read_columns


def drift_path(new_cache: str | Path, old_fingerprint: str) -> Path:
    """Where the drift from a cache of `old_fingerprint` to `new_cache` is kept (beside the cache folder, so the
    cache itself holds only what its manifest lists)."""
    new = Path(new_cache)
    return new.parent / f"{new.name}.drift-{old_fingerprint[:16]}.json"


def compare_caches(old: str, new: str, top: int = 10) -> dict[str, Any]:
    """The drift from `old` to `new` (see module docstring); refuses other heads or another label set."""
    m_old, m_new = open_manifest(old)[2], open_manifest(new)[2]
    for m, where in ((m_old, old), (m_new, new)):
        if not heads.has(m["head"], heads.DRIFT):
            kinds = " or ".join(heads.with_capability(heads.DRIFT))
            raise CacheFormatError(f"{where}: drift is measured between {kinds} caches (this one is {m['head']})")
    if m_old["label_names"] != m_new["label_names"]:
        raise CacheFormatError(f"{new}: label set {m_new['label_names']} differs from {old}'s "
                               f"{m_old['label_names']}: their targets do not compare")
    names, text = m_new["label_names"], m_new["text_fields"][0]
    out: dict[str, Any] = {"old": {"cache": str(old), "fingerprint": m_old["fingerprint"]},
                           "new": {"cache": str(new), "fingerprint": m_new["fingerprint"]},
                           "changed_inputs": diff_fields(m_old["fingerprint_inputs"], m_new["fingerprint_inputs"]),
                           "splits": {}}
    for split in [s for s in m_new["splits"] if s in m_old["splits"]]:
        cols = {}
        for key, url in (("old", old), ("new", new)):
            c = read_columns(url, split, ["id", text, "logits", "label"])
            cols[key] = {"pos": {i: n for n, i in enumerate(c["id"])}, "text": c[text],
                         "logits": np.stack(c["logits"]).astype(np.float32), "label": c["label"], "ids": c["id"]}
        o, n = cols["old"], cols["new"]
        both = [(o["pos"][i], n["pos"][i]) for i in n["ids"] if i in o["pos"]
                and o["text"][o["pos"][i]] == n["text"][n["pos"][i]]]
        if not both:
            continue
        io, inew = (np.array(x) for x in zip(*both))
        lp_old, lp_new = log_softmax(o["logits"][io]), log_softmax(n["logits"][inew])
        kl = (np.exp(lp_old) * (lp_old - lp_new)).sum(1)
        kl = np.where(kl < 0, 0.0, kl)  # float rounding of identical rows
        pred_old, pred_new = lp_old.argmax(1), lp_new.argmax(1)
        labels = np.array([-1 if y is None else y for y in (n["label"][j] for j in inew)])
        labelled = labels >= 0
        per_class = {}
        for c, name in enumerate(names):  # by the old teacher's prediction (gold labels may be missing)
            mask = pred_old == c
            if mask.any():
                per_class[name] = {"rows": int(mask.sum()), "mean_kl": float(kl[mask].mean()),
                                   "changed": int((pred_new[mask] != c).sum())}
        order = np.argsort(-kl)[:top]
        out["splits"][split] = {
            "rows_compared": len(both), "rows_only_old": len(o["ids"]) - len(both),
            "rows_only_new": len(n["ids"]) - len(both), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "agreement": float((pred_old == pred_new).mean()), "changed_predictions": int((pred_old != pred_new).sum()),
            "old_accuracy": float((pred_old[labelled] == labels[labelled]).mean()) if labelled.any() else None,
            "new_accuracy": float((pred_new[labelled] == labels[labelled]).mean()) if labelled.any() else None,
            "per_class": per_class,
            "moved_most": [{"id": n["ids"][inew[k]], "text": n["text"][inew[k]][:120], "kl": float(kl[k]),
                            "old": f"{names[pred_old[k]]} {np.exp(lp_old[k]).max():.2f}",
                            "new": f"{names[pred_new[k]]} {np.exp(lp_new[k]).max():.2f}"} for k in order]}
    return out


def write_drift(drift: dict[str, Any]) -> Path:
    """Keep the drift beside the new cache (see `drift_path`)."""
    path = drift_path(drift["new"]["cache"], drift["old"]["fingerprint"])
    path.write_text(json.dumps(drift, indent=1))
    return path


def read_drift(cache: str, old_fingerprint: str) -> dict[str, Any] | None:
    """The drift kept for a move from a cache of `old_fingerprint` to `cache`, if one was measured."""
    path = drift_path(cache, old_fingerprint)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
