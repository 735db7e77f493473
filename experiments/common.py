"""Shared by the experiments: the repository root on sys.path, and the `machine:` line each prints first.

Import this module before torch (each experiment does): it imports `dtrak_core` first, which sets
OMP_WAIT_POLICY=PASSIVE as the app and CLI get it.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dtrak_core  # noqa: E402,F401  first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP

# isort: split
import torch  # noqa: E402


def machine_line() -> str:
    """Cores, torch threads and load: the numbers come from a shared 2-core machine."""
    load = os.getloadavg()
    device = "cpu" + ("" if not torch.cuda.is_available() else
                      f" ({torch.cuda.device_count()} CUDA device(s) present, unused)")
    return (f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (1/5/15 min), device {device}")


def labelled(root: str, rows) -> list:
    """Counterfactual results with the target's and the regenerated image's class: as the job files
    hold them where they were measured with a classifier, else as the folder's classifier/ reads
    them (as `counterfactual-own measure` does for its summary)."""
    if all(r.label_before >= 0 for r in rows):
        return list(rows)
    from dtrak_core.evaluation.counterfactual_report import classify_result
    from dtrak_core.model.classifier import folder_classifier

    classifier = folder_classifier(root)
    if classifier is None:
        raise SystemExit(f"{root}: the jobs carry no labels and the folder has no classifier/")
    return [r if r.label_before >= 0 else classify_result(r, classifier) for r in rows]
