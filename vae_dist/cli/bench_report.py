"""What `vae-bench` reports: the JSON result (settings, machine, each variant's examples/s and the
toolkit's ratios to the others) and the Markdown table docs/performance.md quotes."""

from __future__ import annotations

import argparse
import platform
import statistics

from vae_dist.cli.bench_loops import Context

WHAT = {
    "original": "torchvision MNIST, PIL + ToTensor per example, DataLoader, sigmoid + BCE, .item() per step",
    "minimal": "split as one float tensor, batches by indexing, .item() per step",
    "floor": "fused Adam, batch = slice of the permuted split, no per-step sync",
    "toolkit": "vae_dist Trainer: train_step + after_optimizer_step, as fit() drives them",
}


def machine() -> dict:
    from vae_dist.processes import cpu_model, usable_cores

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def toolkit_step(trainer) -> str | None:
    """How the toolkit ran its optimizer step: one CUDA graph, or eager (and why, when graphs were asked for)."""
    return None if trainer is None else trainer.step_fn.describe()


def others_cores(variants: dict[str, dict]) -> list[float]:
    """The cores other processes kept busy during each timed repeat of every variant (where measured)."""
    return [o for v in variants.values() for o in v["others_cores"] if o is not None]


def toolkit_ratios(variants: dict[str, dict]) -> tuple[dict[str, float], dict[str, float]]:
    """toolkit/other of the median examples/s, and the median of the per-repeat ratios."""
    ratios, repeat_ratios = {}, {}
    if "toolkit" in variants:
        for other in ("original", "minimal", "floor"):
            if other in variants:
                ratios[f"toolkit/{other}"] = variants["toolkit"]["examples_per_s"] / variants[other]["examples_per_s"]
                # Repeat r of both ran back to back under the same load: their ratio is the steadier number.
                pairs = zip(variants["toolkit"]["runs"], variants[other]["runs"])
                repeat_ratios[f"toolkit/{other}"] = statistics.median(t / o for t, o in pairs)
    return ratios, repeat_ratios


def bench_result(
    args: argparse.Namespace, ctx: Context, variants: dict[str, dict], threads: int, load_average: list
) -> dict:
    """The JSON result; `load_average`: the 1-minute load average before and after the timing."""
    import torch

    others = others_cores(variants)
    ratios, repeat_ratios = toolkit_ratios(variants)
    return {
        "settings": {
            "device": ctx.device.type,
            "gpu": torch.cuda.get_device_name() if ctx.device.type == "cuda" else None,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "compile": args.compile,
            "threads": threads,
            "minimal_loss": args.minimal_loss,
            "minimal_adam": args.minimal_adam,
            "data": ctx.data_label(),
            "real_data": ctx.real,
            "torch": torch.__version__,
            "denormals": args.denormals,
            "load_average": load_average,  # 1-minute, before and after the timing
            "others_cores_max": max(others) if others else None,
            "toolkit_step": toolkit_step(ctx.trainer),
        },
        "machine": machine(),
        "variants": variants,
        "ratios": ratios,
        "median_repeat_ratios": repeat_ratios,
    }


def render(result: dict) -> str:
    """The markdown table and the ratio line: what docs/performance.md quotes."""
    s = result["settings"]
    m = result["machine"]
    dev = s["device"] if s["device"] == "cpu" else f"{s['device']} ({s['gpu']})"
    lines = [
        f"vae_dist bench: {dev}, {m['cpu']}, {m['cores']} cores, {s['threads']} torch threads, torch {s['torch']}",
        f"precision {s['precision']}, batch {s['batch_size']}, compile {s['compile']}, denormals {s['denormals']}, "
        f"{s['steps']} steps x {s['repeats']} repeats after {s['warmup']} warm-up steps, data: {s['data']}",
        *(
            [f"other processes used at most {s['others_cores_max']:.2f} cores during the timed repeats"]
            if s["others_cores_max"] is not None
            else []
        ),
        "",
    ]
    mem = any("peak_rss_mib" in v for v in result["variants"].values())
    head = "| variant | what | examples/s (median) | min - max | ms/step |" + (" peak RSS (MiB) |" if mem else "")
    lines += [head, "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if mem else "")]
    for name, v in result["variants"].items():
        what = WHAT[name]
        if name == "minimal":
            what += f" ({s['minimal_loss']} loss, {s['minimal_adam']} Adam)"
        if name == "floor" and s["device"] == "cuda":
            what += "; the whole step as one CUDA graph" if s["precision"] != "fp16" else "; eager (fp16)"
        if name == "toolkit" and s.get("toolkit_step"):
            what += f"; step: {s['toolkit_step']}"
        row = (
            f"| {name} | {what} | {v['examples_per_s']:,.0f} | {min(v['runs']):,.0f} - {max(v['runs']):,.0f} "
            f"| {v['ms_per_step']:.2f} |"
        )
        if mem:
            row += f" {v['peak_rss_mib']:,.0f} |" if "peak_rss_mib" in v else " |"
        lines.append(row)
    if result["ratios"]:
        lines += ["", "  ".join(f"{k}: {v:.2f}x" for k, v in result["ratios"].items())]
        lines += [
            "median of per-repeat ratios: "
            + "  ".join(f"{k} {v:.2f}x" for k, v in result["median_repeat_ratios"].items())
        ]
    return "\n".join(lines)
