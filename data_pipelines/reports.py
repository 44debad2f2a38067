"""Plain-text renderings of what write_from_manifest and verify_shards return, for a command line.

Pure functions: they return strings and print nothing.
"""

from typing import Any


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_write_summary(summary: dict[str, Any], *, max_rows: int = 20) -> str:
    """What write_from_manifest wrote (per split: samples, shards, bytes, pattern) and what it skipped, why."""
    lines = [
        f"{summary['written']} of {summary['rows']} manifest rows written to {summary['out_dir']} "
        f"in {summary['seconds']:.1f} s"
    ]
    for name, split in summary["splits"].items():
        if not split["total"]:
            lines.append(f"  {name}: nothing (every row of this split was skipped)")
            continue
        size = _human(sum(split["bytes"].values()))
        lines.append(
            f"  {name}: {split['total']} samples in {len(split['shards'])} shards ({size}): {split['pattern']}"
        )
        if split["oversize"]:
            lines.append(f"    {len(split['oversize'])} samples larger than max_bytes got a shard each")
    modalities = ", ".join(f"{m} {n}" for m, n in summary["modalities"].items())
    lines.append(f"  modalities: {modalities or 'none'}")
    if summary.get("duplicates"):
        reasons = ", ".join(f"{n} {reason}" for reason, n in summary["duplicates"].items())
        lines.append(
            f"dropped {sum(summary['duplicates'].values())} duplicate rows: {reasons}, keeping the first of "
            f"each (all in {summary['duplicates_file']})"
        )
    elif "duplicates" in summary:
        lines.append("no duplicate rows")
    if summary["skipped"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in summary["skipped"].items())
        lines.append(
            f"skipped {sum(summary['skipped'].values())} rows: {kinds} (all in {summary['skipped_file']})"
        )
        for row in summary["skipped_rows"][:max_rows]:
            lines.append(f"  line {row['row']} (key {row['key']}): {row['kind']}: {row['reason']}")
        if len(summary["skipped_rows"]) > max_rows:
            lines.append(f"  ... {len(summary['skipped_rows']) - max_rows} more")
    return "\n".join(lines)


def _labels(report: dict[str, Any]) -> str:
    """ "integer 0, name 12 (3 classes: cat, dog, fox), absent 2, bad 1", and a warning when a split
    mixes integers and names (evaluation refuses that)."""
    counts = report["labels"]
    names = report["label_names"]
    shown = ", ".join(list(names)[:10]) + (", ..." if len(names) > 10 else "")
    parts = [f"{kind} {n}" + (f" ({len(names)} classes: {shown})" if kind == "name" and n else "")
             for kind, n in counts.items()]  # fmt: skip
    mixed = (
        "; integers and names mixed: evaluation refuses such a split"
        if counts["integer"] and counts["name"]
        else ""
    )
    return ", ".join(parts) + mixed


def format_verify_report(report: dict[str, Any], *, max_bad: int = 50) -> str:
    """verify_shards' counts per modality, every unreadable shard and (up to max_bad) bad samples."""
    lines = [
        f"{report['shards']} shards, {report['samples']} samples, {report['good']} good "
        f"(layout {report['layout']!r})",
        "  modalities: " + ", ".join(f"{m} {n}" for m, n in report["modalities"].items()),
        "  combinations: " + ", ".join(f"{c} {n}" for c, n in report["combinations"].items()),
        "  file extensions: " + ", ".join(f"{e} {n}" for e, n in report["extensions"].items()),
        "  labels: " + _labels(report),
    ]
    if report["bad"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in report["bad_counts"].items())
        lines.append(f"bad samples: {kinds}")
        for bad in report["bad"][:max_bad]:
            lines.append(f"  {bad['shard']} {bad['key']}: {bad['kind']}: {bad['reason']}")
        if len(report["bad"]) > max_bad:
            lines.append(f"  ... {len(report['bad']) - max_bad} more")
    for bad in report["bad_labels"][:max_bad]:
        lines.append(
            f"  {bad['shard']} {bad['key']}: {bad['kind']} (sample kept, without it): {bad['reason']}"
        )
    if len(report["bad_labels"]) > max_bad:
        lines.append(f"  ... {len(report['bad_labels']) - max_bad} more bad labels")
    for shard in report["unreadable"]:
        after = f" after sample {shard['key']!r}" if shard["key"] else ""
        lines.append(f"UNREADABLE {shard['shard']}{after}: {shard['kind']}: {shard['reason']}")
    for mismatch in report["sizes_mismatch"]:
        lines.append(
            f"sizes.json says {mismatch['sizes_json']} samples for {mismatch['shard']}, read {mismatch['read']}"
        )
    return "\n".join(lines)
