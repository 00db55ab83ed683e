"""The benchmark's Markdown table and plot."""

from __future__ import annotations

from pathlib import Path


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", "",
             f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, "
             f"torch {payload['machine']['torch']}; {payload['max_tokens']} new tokens x "
             f"{payload['prompts']} prompts per mode.", ""]
    for topology in payload["topologies"]:
        rows = [r for r in payload["rows"] if r["topology"] == topology]
        plain = next(r for r in rows if r["k"] == 0)["tokens_per_second"]
        lines += [f"### {topology}", "",
                  f"Model `{rows[0]['extra']['model']}`; single-process `transformers` greedy `generate()`, "
                  f"no network (the ceiling): **{rows[0]['extra']['single_process_tokens_per_second']:.1f} tok/s**.",
                  "",
                  "| mode | tok/s | x plain | acceptance | tokens/traversal | chunks sent / wasted / cancelled "
                  "| bound tok/s | efficiency | lossless |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
        for r in rows:
            lines.append(
                f"| {r['mode']} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / plain:.1f}x "
                f"| {r['acceptance']:.2f} | {r['tokens_per_traversal']:.2f} "
                f"| {r['chunks_sent']} / {r['chunks_wasted']} / {r['chunks_cancelled']} "
                f"| {r['bound_tokens_per_second']:.1f} | {r['efficiency']:.2f} | {'yes' if r['lossless'] else 'NO'} |")
        lines.append("")
    for check in payload.get("compute_check", []):
        lines += [f"Compute-dominated model on `lan` ({check['model']}, {check['threads_per_node']} torch "
                  f"thread(s) per node and for the single process, {len(check['rounds'])} rounds of "
                  f"{check['tokens']} tokens): plain pipeline over {check['stages']} stages "
                  f"{check['pipeline_tokens_per_second']:.2f} tok/s vs single process "
                  f"{check['single_process_tokens_per_second']:.2f} tok/s: **{check['ratio']:.3f}x** "
                  f"(median of the rounds' ratios{_quartiles(check)}; lossless: "
                  f"{'yes' if check['lossless'] else 'NO'}).", ""]
        if "stage_compute_ms_per_token" in check:
            lines += [f"Per token (medians): single process {check['single_process_ms_per_token']:.1f} ms; "
                      f"the stages' compute {check['stage_compute_ms_per_token']:.1f} ms; the pipeline's own "
                      f"overhead (hops, sealing, scheduling) {check['pipeline_overhead_ms_per_token']:.2f} ms.", ""]
        if "bare_processes_ratio" in check:
            lines += [f"The floor for any split into processes on this machine: the same two blocks in two bare "
                      f"processes joined by a pipe (no gRPC, TLS, sealing or event loop) run "
                      f"**{check['bare_processes_ratio']:.3f}x** the single process, their compute "
                      f"{check['bare_processes_compute_ms_per_token']:.1f} ms per token; the swarm runs "
                      f"**{check['pipeline_vs_bare_processes']:.3f}x** the bare processes (medians of the rounds).", ""]
    return "\n".join(lines)


def _quartiles(check: dict) -> str:
    if "ratio_quartiles" in check:
        low, high = check["ratio_quartiles"]
        return f", quartiles {low:.3f}-{high:.3f}"
    return ", rounds " + ", ".join(f"{r['ratio']:.3f}" for r in check["rounds"])


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topologies = payload["topologies"]
    figure, axes = plt.subplots(1, len(topologies), figsize=(6 * len(topologies), 5), squeeze=False)
    for axis, topology in zip(axes[0], topologies):
        rows = [r for r in payload["rows"] if r["topology"] == topology]
        names = [r["mode"] for r in rows]
        axis.bar(range(len(rows)), [r["tokens_per_second"] for r in rows], label="measured")
        axis.scatter(range(len(rows)), [r["bound_tokens_per_second"] for r in rows], color="black",
                     marker="_", s=400, label="analytic bound")
        axis.axhline(rows[0]["extra"]["single_process_tokens_per_second"], color="gray", linestyle="--",
                     label="single process, no network")
        axis.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("tokens / s")
        axis.set_title(topology)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
