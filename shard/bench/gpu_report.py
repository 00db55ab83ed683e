"""The Markdown page of `shard bench gpu` results."""

from __future__ import annotations

from shard.bench.concurrency import rounds_tables

MiB = 2**20


def doc(payload: dict) -> str:
    one_process = payload["one_process"]
    one = one_process["tokens_per_second"] if one_process else None
    lines = [
        "# Benchmarks on a GPU", "",
        f"Command: `{payload['command']}`", "",
        f"Device: **{payload['machine']['device']}** ({payload['device']}, {payload['dtype']}); host "
        f"{payload['machine']['cpu']}, {payload['machine']['cores']} cores, torch {payload['machine']['torch']}.",
        "",
        f"Models: {payload['shapes']}, random weights made on the device from dummy-weight folders "
        f"(`shard.model.dummy`: nothing written but a config); target {payload['model_bytes'] / MiB:.0f} MiB. "
        f"{payload['max_tokens']} new tokens x {payload['prompts']} prompt(s) per mode. Drafts: "
        + ", ".join(f"`{label}` = `{spec}`" for label, spec in payload["drafts"].items()) + ". "
        "No real pair of small models sharing a tokenizer is available offline, so `oracle:P` drafts run a "
        "real draft model for its cost but propose the target's own greedy token with probability P.", "",
        (f"One process, eager `generate()`: **{one:.1f} tok/s** (load {one_process['load_seconds']:.1f} s)."
         if one_process else "No one process holds this target: every mode is checked against the swarm's plain "
         "decode."),
        f"Stages on: {', '.join(payload['gpus'])} (round robin)"
        + (f", with {' '.join(f'`{a}`' for a in payload['kv_args'])}." if payload.get("kv_args") else ".")
        + (f" Coordinator with {' '.join(f'`{a}`' for a in payload['draft_args'])}."
           if payload.get("draft_args") else ""), "",
        "## Micro benchmarks", "",
    ]
    for name, result in payload["micro"].items():
        values = {k: v for k, v in result.items() if k not in ("title", "status")}
        lines += [f"**{name}**{': ' + result['title'] if 'title' in result else ''} ({result['status']})", ""]
        if values:
            lines += ["| quantity | value |", "|---|---:|", *(f"| {k} | {_cell(v)} |" for k, v in values.items()), ""]
    exact = payload["dtype"] == "float32" and one_process is not None
    lines += [
        "## End to end, real stage processes over emulated links", "",
        "`= generate()`: tokens matching one-process `generate()` before the first difference, per prompt, "
        "with the reference's top-1 minus top-2 logit there. `= plain`: the same tokens as this swarm's plain "
        f"decode. Must hold here: {'`= generate()`' if exact else '`= plain` (bfloat16)'}.", ""]
    for topology in payload["topologies"]:
        rows = [r for r in payload["rows"] if r["topology"] == topology]
        plain = next(r for r in rows if r["k"] == 0)["tokens_per_second"]
        lines += [f"### {topology}", "",
                  "| mode | tok/s | x plain | x one process | acceptance | tokens/traversal | stage ms/chunk "
                  "| bound tok/s | efficiency | = generate() | = plain | ok |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|:-:|:-:|"]
        for r in rows:
            stage_ms = " / ".join(f"{s * 1e3:.1f}" for s in r["stage_seconds_per_chunk"])
            lines.append(
                f"| {r['mode']} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / plain:.2f} "
                f"| {_ratio(r['tokens_per_second'], one)} | {r['acceptance']:.2f} | {r['tokens_per_traversal']:.2f} "
                f"| {stage_ms} | {r['bound_tokens_per_second']:.1f} | {r['efficiency']:.2f} "
                f"| {_prefixes(r)} | {'yes' if r['extra']['equals_swarm_plain'] else 'NO'} "
                f"| {'yes' if r['extra']['ok'] else 'NO'} |")
        overhead = next(r for r in rows if r["k"] == 0)["extra"].get("overhead_seconds_per_hop")
        if overhead is not None:
            lines += ["", f"Per hop, beyond its link's delay and the stages' compute (gRPC, sealing, copies; from "
                          f"the plain row): {overhead * 1e3:.2f} ms."]
        lines += ["", *_memory(payload["memory"][topology]), ""]
    if payload.get("concurrency"):
        lines += ["## Many sessions at once", "",
                  "Rounds of concurrent plain-decode sessions on the same swarms, after the modes above (one "
                  "client connection per session; `x one`: the round's aggregate over the one-session round's; "
                  "stage busy: each stage's compute time over the round's wall time). Lossless: each session's "
                  "tokens equal its prompt generated alone on the same swarm.", "",
                  *rounds_tables(payload["concurrency"])]
    return "\n".join(lines)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def _prefixes(row: dict) -> str:
    if "matched_prefix" not in row["extra"]:
        return "-"
    parts = []
    for matched, total, margin in zip(row["extra"]["matched_prefix"], map(len, row["outputs"]),
                                      row["extra"]["divergence_margins"]):
        diverged = margin is not None and matched < total
        parts.append(f"{matched}/{total}" + (f" (margin {margin:.3g})" if diverged else ""))
    return ", ".join(parts)


def _memory(memory: dict) -> list[str]:
    lines = ["| node | layers | memory (MiB) | block weights (MiB) | KV budget (MiB) | memory / weights |",
             "|---|---|---:|---:|---:|---:|"]
    for r in memory["nodes"]:
        layers = f"[{r['layers'][0]}, {r['layers'][1]})" if "layers" in r else "drafts"
        held = f"{r['bytes'] / MiB:.0f} ({r['memory']})" if r["bytes"] else f"unknown ({r['memory']})"
        weights = f"{r['weight_bytes'] / MiB:.0f}" if "weight_bytes" in r else ""
        budget = f"{r['kv_budget_bytes'] / MiB:.0f}" if "kv_budget_bytes" in r else ""
        ratio = f"{r['over_weights']:.2f}" if r.get("over_weights") else ""
        lines.append(f"| {r['node']} | {layers} | {held} | {weights} | {budget} | {ratio} |")
    if memory.get("device_used_bytes"):
        lines += ["", f"The whole GPU in use then (every process): {memory['device_used_bytes'] / MiB:.0f} MiB."]
    return lines


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return str(value)
