"""gpu_check.py's summary: the targets measured against, and the JSON + Markdown files."""

from __future__ import annotations

import json
from pathlib import Path

# (key, what, threshold, direction) from the performance issue the acceptance run answers.
TARGETS = [
    ("lrcl_mfu", "LRCL step MFU (fast path, 6NT FLOPs, card's dense bf16 peak)", 0.40, ">="),
    ("lrcl_speedup", "LRCL step: fast vs literal", 1.3, ">="),
    ("crrl_speedup", "CRRL step: fast vs literal", 8.0, ">="),
    ("export_speedup", "export: fast vs literal at equal batch, fp32", 1.8, ">="),
    ("lrcl_paper_memory_gib", "paper-scale LRCL (Qwen2.5-0.5B, 64 x 2 views x 128 tokens, bf16): peak reserved GiB",
     24.0, "<="),
]  # fmt: skip
RUNS = ("lrcl_single", "lrcl_zero2", "lrcl_fsdp2", "crrl_single", "crrl_zero2")


def _rows(summary: dict, section: str) -> list[dict]:
    s = summary["sections"].get(section, {})
    return s.get("rows", []) if s.get("status") == "ok" else []


def _row(rows: list[dict], *paths: str) -> dict | None:
    """The first row whose path is one of `paths`, in that order of preference."""
    for path in paths:
        for row in rows:
            if row.get("path") == path:
                return row
    return None


def _ratio(slow: dict | None, fast: dict | None, key: str) -> float | None:
    try:
        return round(float(slow[key]) / float(fast[key]), 3)
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return None


def measured_values(summary: dict) -> dict:
    lrcl = _rows(summary, "lrcl_bench")
    lrcl_fast = _row(lrcl, "fast+template", "fast")
    crrl = _rows(summary, "crrl_bench")
    export = _rows(summary, "export_bench")
    export_fast = _row(export, "fast+template, fp32", "fast, fp32", "fast, sorted, fp32")
    single = summary["sections"].get("lrcl_single", {})
    mfu = lrcl_fast.get("mfu") if lrcl_fast else None
    return {
        "lrcl_mfu": float(mfu) if isinstance(mfu, (int, float)) else None,
        "lrcl_speedup": _ratio(_row(lrcl, "literal"), lrcl_fast, "step_ms"),
        "crrl_speedup": _ratio(_row(crrl, "literal"), _row(crrl, "fast"), "step_ms"),
        "export_speedup": _ratio(_row(export, "literal, unsorted, fp32"), export_fast, "seconds"),
        "lrcl_paper_memory_gib": single.get("max_memory_reserved_gib"),
    }


def evaluate_targets(summary: dict) -> list[dict]:
    values = measured_values(summary)
    gpu = summary["mode"] == "gpu"
    out = []
    for key, what, threshold, direction in TARGETS:
        value = values[key]
        met = None
        if gpu and value is not None:
            met = value >= threshold if direction == ">=" else value <= threshold
        out.append({"key": key, "target": what, "threshold": f"{direction} {threshold:g}", "measured": value,
                    "met": met})  # fmt: skip
    return out


# ---- files -----------------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return ["(no rows)"]
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return lines


def _run_row(name: str, s: dict) -> dict:
    losses = s.get("losses") or []
    holding = s.get("holding") or {}
    held = holding.get("wrapper")
    if holding.get("zero_stage") is not None:
        held = f"{held}, ZeRO-{holding['zero_stage']}"
    if holding.get("dtensors"):
        held = f"{held}, {holding['dtensors']}/{holding['parameters']} DTensor {holding.get('placements')}"
    steps = s.get("steps")
    return {
        "run": name, "status": s.get("status"), "config": s.get("config"), "steps": steps,
        "loss first -> last": f"{losses[0]:.4g} -> {losses[-1]:.4g}" if losses else None,
        "train s/step": round(s["train_seconds"] / steps, 3) if s.get("train_seconds") and steps else None,
        "peak alloc GiB": s.get("max_memory_allocated_gib"), "peak reserved GiB": s.get("max_memory_reserved_gib"),
        "trainable changed": f"{s['changed']}/{s['compared_with_start']}" if "changed" in s else None,
        "reload max diff (tensors / embeddings)": (
            f"{_fmt(s.get('reload_max_abs_tensor_diff'))} / {_fmt(s.get('reload_max_abs_embedding_diff'))}"
            if "reload_tensors_compared" in s else None),
        "held as": held,
    }  # fmt: skip


def markdown(summary: dict) -> str:
    sections = summary["sections"]
    env = sections.get("env", {})
    lines = [f"# GPU acceptance run ({summary['mode']})", "",
             f"Started {summary['started']}, {summary.get('elapsed_seconds')} s in all. "
             f"Machine: {env.get('machine')}; bf16 peak {_fmt(env.get('bf16_peak_tflops'))} TFLOP/s. "
             f"Versions: {', '.join(f'{k} {v}' for k, v in (env.get('versions') or {}).items())}.", ""]
    if summary["mode"] != "gpu":
        lines += ["Tiny CPU rehearsal: the numbers show the run works end to end, not the targets.", ""]
    lines += ["## Targets", ""]
    lines += _table([{"target": t["target"], "threshold": t["threshold"], "measured": t["measured"],
                      "met": t["met"]} for t in summary["targets"]])  # fmt: skip
    for name, heading in (("lrcl_bench", "LRCL step"), ("crrl_bench", "CRRL step"), ("export_bench", "Export")):
        s = sections.get(name, {})
        lines += ["", f"## {heading} ({name})", ""]
        if s.get("status") == "ok":
            lines += [f"`{s['command']}`", "", s.get("title") or "", ""] + _table(s["rows"])
            lines += [f"- {k}: {_fmt(v)}" for k, v in (s.get("differences") or {}).items()]
        else:
            lines += [f"{s.get('status', 'not run')}: {s.get('reason') or ''}"]
    lines += ["", "## Recipes through accelerate launch", ""]
    lines += _table([_run_row(n, sections.get(n, {"status": "not run"})) for n in RUNS])
    lines += [""] + [f"- {n}: `{sections[n]['command']}`" for n in RUNS if sections.get(n, {}).get("command")]
    export = sections.get("export", {})
    lines += ["", "## Export (one process)", ""]
    if export.get("status") == "ok":
        lines += [f"`{export['command']}`: {export['items']} items in {export['wall_seconds']} s wall "
                  f"({export['items_per_s_wall']} items/s, model load included); table {export['shape']}, "
                  f"finite: {_fmt(export['finite'])}"]
    else:
        lines += [f"{export.get('status', 'not run')}: {export.get('reason') or ''}"]
    errors = {n: s for n, s in sections.items() if s.get("status") in ("error", "skipped")}
    if errors:
        lines += ["", "## Errors and skipped sections", ""]
        for name, s in errors.items():
            text = (s.get("error") or s.get("reason") or "")[-3000:]
            lines += [f"### {name} ({s['status']})", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, output: Path) -> None:
    """gpu_check.json (everything) and gpu_check.md (the tables), replaced atomically after every section."""
    files = {"gpu_check.json": json.dumps(summary, indent=2, default=str), "gpu_check.md": markdown(summary)}
    for name, text in files.items():
        tmp = output / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(output / name)
