"""The training check of bench/gpu_check.sh (issue 26): train.py's own main(), every method, a few steps on
tiny-llama in bf16 with non-reentrant checkpointing, and --resume from a mid-run checkpoint against the
uninterrupted run. Made for CUDA; runs the same on CPU (where a small run takes seconds).

    python bench/gpu_train_check.py --out out/gpu/train-check.json          # on the GPU machine
    python bench/gpu_train_check.py --out /tmp/t.json --methods lora g2r2   # CPU, a subset

Per method, four runs of train.main on the built-in task (--max_steps N, batch 4 in micro-batches of 2, dropout
0.1, --save_every N/2; stage lengths put G²R²'s pruning and refinement and PiLoRA's switch inside the N steps):
  full     uninterrupted;
  stopped  the same run stopped after its checkpoint at N/2 (--stop_after, as if killed);
  resumed  --resume from that checkpoint to N, in the stopped run's folder;
  again    the uninterrupted run once more: the device's run-to-run floor (non-deterministic kernels).
Recorded per method: each run's losses, the largest difference of the resumed run from the full one (losses and
every trainable tensor of adapter.safetensors), the same for `again`, and `resume_exact` (bit for bit equal) /
`resume_ok` (exact, or no further from the full run than `again` is); the dtypes training ran with (frozen
weights, trainable tensors, rotary inv_freq buffers) and `dtypes_ok` (bf16, fp32, fp32 for --dtype bf16; recorded,
not part of the exit status), stages, parameter counts, step time and peak memory from
the run's summary. A failing run is recorded with its error and the next method runs. The JSON is rewritten
after every method, so a run cut short keeps what it checked.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

METHODS = ["lora", "g2r2", "pilora", "taso", "spsft"]


def method_flags(method, steps):
    """Stage lengths in thirds of the run: with 6 steps resumed at 3, G²R² warms up at 0-1, prunes at 2-3
    (resumed inside) and refines at 4-5; PiLoRA's stage 1 is 0-1, stage 2 from 2."""
    third = str(max(1, steps // 3))
    return {"lora": [], "g2r2": ["--g2r2_warmup", third, "--g2r2_prune", third],
            "pilora": ["--pilora_phase", third, "--pilora_interval", "1"],
            "taso": ["--taso_calib_batches", "2"],
            "spsft": ["--spsft_importance", "taylor", "--spsft_calib_batches", "2"]}[method]


def run_argv(method, out_dir, steps, dtype, model, extra=()):
    return ["--method", method, "--model", model, "--dtype", dtype, "--grad_ckpt", "--max_steps", str(steps),
            "--batch_size", "4", "--micro_batch_size", "2", "--dropout", "0.1", "--max_len", "256",
            "--eval_limit", "2", "--eval_batch_size", "2", "--max_samples", "32", "--save_every", str(steps // 2), "--seed", "0",
            "--output_dir", out_dir, *method_flags(method, steps), *extra]


@contextlib.contextmanager
def watch_dtypes(into):
    """Record, right after train.py makes the trainable tensors fp32, the dtypes and device training runs with."""
    real = train.to_fp32

    def to_fp32(model):
        real(model)
        kinds = {"frozen": set(), "trainable": set(), "inv_freq": set(), "device": set()}
        for p in model.parameters():
            kinds["trainable" if p.requires_grad else "frozen"].add(str(p.dtype).replace("torch.", ""))
            kinds["device"].add(p.device.type)
        for n, b in model.named_buffers():
            if n.endswith("inv_freq"):
                kinds["inv_freq"].add(str(b.dtype).replace("torch.", ""))
        into.update({k: sorted(v) for k, v in kinds.items()})
    train.to_fp32 = to_fp32
    try:
        yield
    finally:
        train.to_fp32 = real


def adapter(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "adapter.safetensors"))


def max_diff(a, b):
    """Largest |a - b| over the losses (lists) or the tensors (dicts of the same names); inf when they differ
    in length, names or shapes."""
    if isinstance(a, dict):
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            return float("inf")
        return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def check_method(method, work, steps, dtype, model):
    out = {"method": method, "flags": method_flags(method, steps)}
    dirs = {k: os.path.join(work, f"{method}-{k}") for k in ("full", "stopped", "again")}
    t0 = time.time()
    with watch_dtypes(out.setdefault("dtypes", {})):
        full = train.main(run_argv(method, dirs["full"], steps, dtype, model))
    out["full_s"] = time.time() - t0
    out["losses"] = full["losses"]
    keep = ("trainable_params_start", "trainable_params_end", "peak_memory_bytes", "step_time_s", "stage_times_s",
            "device", "dtype", "grad_ckpt", "steps")
    out.update({k: full.get(k) for k in keep})
    t1 = time.time()
    stopped = train.main(run_argv(method, dirs["stopped"], steps, dtype, model, ["--stop_after", str(steps // 2)]))
    out["stopped_at"] = stopped.get("stopped_at") if stopped else None
    resumed = train.main(run_argv(method, dirs["stopped"], steps, dtype, model, ["--resume"]))
    out["resume_s"] = time.time() - t1
    out["resumed_losses"] = resumed["losses"]
    t2 = time.time()
    again = train.main(run_argv(method, dirs["again"], steps, dtype, model))
    out["again_s"] = time.time() - t2
    ref = adapter(dirs["full"])
    out["resume_loss_diff"] = max_diff(full["losses"], resumed["losses"])
    out["resume_tensor_diff"] = max_diff(ref, adapter(dirs["stopped"]))
    out["again_loss_diff"] = max_diff(full["losses"], again["losses"])
    out["again_tensor_diff"] = max_diff(ref, adapter(dirs["again"]))
    d = out["dtypes"]  # issue 26: bf16 weights, fp32 adapters, fp32 rotary frequencies (on CPU too with --dtype bf16)
    out["dtypes_ok"] = None if not d else d["trainable"] == ["float32"] and d["inv_freq"] in ([], ["float32"]) \
        and d["frozen"] == (["bfloat16"] if dtype == "bf16" else ["float32"])  # None: train.to_fp32 not seen
    out["resume_exact"] = out["resume_loss_diff"] == 0 and out["resume_tensor_diff"] == 0
    out["resume_ok"] = out["resume_exact"] or (out["resume_loss_diff"] <= out["again_loss_diff"]
                                               and out["resume_tensor_diff"] <= out["again_tensor_diff"])
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of each run (resumed at half)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--deadline_s", type=float, default=0, help="start no method after this many seconds (0: none)")
    p.add_argument("--out", required=True, help="JSON path, rewritten after every method")
    args = p.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be even and >= 2 (the run is resumed at half)")
    return args


def main(argv=None):
    args = parse_args(argv)
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"check": "train", "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "model": args.model,
              "dtype": args.dtype, "steps": args.steps, "methods": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="train-check-") as work:
        for method in args.methods:
            if args.deadline_s and time.time() - t0 > args.deadline_s:
                row = {"method": method, "error": f"skipped: the check's {args.deadline_s:.0f} s are spent"}
            else:
                t = time.time()
                try:
                    row = check_method(method, work, args.steps, args.dtype, args.model)
                except BaseException as e:  # noqa: BLE001 (recorded: the next method still runs)
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    row = {"method": method, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                           "traceback": traceback.format_exc(limit=-4)[-2000:]}
                    del e
                row["wall_s"] = time.time() - t
            result["methods"].append(row)
            result["wall_s"] = time.time() - t0
            result["all_ok"] = all(r.get("resume_ok") for r in result["methods"])
            write_json(result, args.out)
            print(format_row(row), flush=True)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)", flush=True)
    return result


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def format_row(r):
    if "error" in r:
        return f"train-check {r['method']:<7} {'' if r['error'].startswith('skipped') else 'FAILED '}{r['error']}"
    return (f"train-check {r['method']:<7} resume {'exact' if r['resume_exact'] else 'ok' if r['resume_ok'] else 'DIFFERS'}"
            f" (loss diff {r['resume_loss_diff']:.3g}, tensors {r['resume_tensor_diff']:.3g}; rerun "
            f"{r['again_loss_diff']:.3g} / {r['again_tensor_diff']:.3g})  losses {r['losses'][0]:.4f} -> "
            f"{r['losses'][-1]:.4f}  dtypes {'ok' if r['dtypes_ok'] else 'WRONG'} {r['dtypes']}  {r['wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
