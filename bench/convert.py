r"""Conversion benchmark: peak host memory and time of HF -> Orbax and back.

  python -m bench.convert                      # llama3.2-1b shape, float32 (~5 GB)
  python -m bench.convert --quick              # the tiny preset: seconds, for a quick check

Writes a random model with transformers (cached under --cache), then measures in
separate processes, each with its own peak RSS: reading the safetensors bytes cold from
disk, `convert.hf_to_orbax`, `convert.orbax_to_hf`, and transformers loading the same
model whole. The memory limit checked is 2 x the largest tensor + 1.5 GB; the time
limit is conversion within 2 x the cold read.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench import common

# The size the limits are set for; smaller presets are quick checks of the machinery.
REFERENCE = "llama3.2-1b"

_MAKE_HF = r"""
import json, sys, torch, transformers
from llama_jax.config import get_preset
cfg = get_preset(sys.argv[1]).to_hf()
cfg.pop("dtype", None)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
model = model.to(getattr(torch, sys.argv[2]))
model.save_pretrained(sys.argv[3], max_shard_size="2GB")
"""

_READ = r"""
import sys, time
from pathlib import Path
start = time.perf_counter()
n = 0
buf = bytearray(64 << 20)
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
print(n, time.perf_counter() - start)
"""

_LOAD_WHOLE = r"""
import sys, torch, transformers
m = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
# Touch every weight: a memory-mapped load is not resident until read.
with torch.no_grad():
    print(sum(float(p.float().sum()) for p in m.parameters()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=REFERENCE)
    parser.add_argument("--quick", action="store_true", help="the tiny preset")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cache", default="/tmp/llama_jax_bench")
    args = parser.parse_args()
    if args.quick:
        args.preset = "tiny"

    from llama_jax import formats

    py = sys.executable
    cache = Path(args.cache)
    hf_dir = cache / f"hf-{args.preset}-{args.dtype}"
    if not (hf_dir / "config.json").exists():
        print(f"writing a random {args.preset} model with transformers to {hf_dir}", flush=True)
        shutil.rmtree(hf_dir, ignore_errors=True)
        common.run_child([py, "-c", _MAKE_HF, args.preset, args.dtype, str(hf_dir)])
        shutil.copy(common.REPO / "configs/data/tokenizer.json", hf_dir / "tokenizer.json")
    tensors = formats.open_safetensors_dir(str(hf_dir))
    sizes = [tensors[n].get(n).nbytes for n in tensors]
    total, largest = sum(sizes), max(sizes)
    limit = 2 * largest + 1.5e9

    rows = []
    common.evict([hf_dir])
    wall, rss, out = common.run_child([py, "-c", _READ, str(hf_dir)])
    read_s = float(out.split()[-1])
    rows.append(
        dict(step="read safetensors cold", seconds=round(read_s, 2), peak_rss_gb=common.gb(rss))
    )

    out_dir, back_dir = cache / "converted", cache / "exported"
    common.evict([hf_dir])
    convert_s, convert_rss, _ = common.run_child(
        [
            py,
            "-m",
            "convert.hf_to_orbax",
            f"--hf_dir={hf_dir}",
            f"--out_dir={out_dir}",
            "--overwrite",
        ],
        env={"JAX_PLATFORMS": "cpu"},
    )
    rows.append(
        dict(step="hf_to_orbax", seconds=round(convert_s, 2), peak_rss_gb=common.gb(convert_rss))
    )
    common.evict([out_dir])
    export_s, export_rss, _ = common.run_child(
        [
            py,
            "-m",
            "convert.orbax_to_hf",
            f"--model_dir={out_dir}",
            f"--out_dir={back_dir}",
            "--overwrite",
        ],
        env={"JAX_PLATFORMS": "cpu"},
    )
    rows.append(
        dict(step="orbax_to_hf", seconds=round(export_s, 2), peak_rss_gb=common.gb(export_rss))
    )
    common.evict([hf_dir])
    whole_s, whole_rss, _ = common.run_child([py, "-c", _LOAD_WHOLE, str(hf_dir), args.dtype])
    rows.append(
        dict(
            step="transformers from_pretrained (whole)",
            seconds=round(whole_s, 2),
            peak_rss_gb=common.gb(whole_rss),
        )
    )

    # The export must equal the source bit for bit.
    back = formats.open_safetensors_dir(str(back_dir))
    equal = set(back) == set(tensors) and all(
        (tensors[n].get(n).view("uint8") == back[n].get(n).view("uint8")).all() for n in tensors
    )
    print(common.table(rows, ["step", "seconds", "peak_rss_gb"]))
    summary = dict(
        model_gb=common.gb(total),
        largest_tensor_gb=common.gb(largest),
        rss_limit_gb=common.gb(limit),
        convert_rss_within_limit=convert_rss <= limit,
        export_rss_within_limit=export_rss <= limit,
        convert_over_cold_read=round(convert_s / read_s, 2),
        export_over_cold_read=round(export_s / read_s, 2),
        round_trip_bitwise_equal=bool(equal),
    )
    for k, v in summary.items():
        print(f"{k}: {v}")
    at_reference = args.preset == REFERENCE
    targets = [
        common.target(
            "convert_peak_rss",
            "hf_to_orbax peak RSS within 2 x the largest tensor + 1.5 GB",
            common.gb(convert_rss),
            summary["rss_limit_gb"],
            "<=",
            "GB",
            at_reference,
        ),
        common.target(
            "convert_time",
            "hf_to_orbax time over a cold read of the safetensors",
            summary["convert_over_cold_read"],
            2.0,
            "<=",
            "x the cold read",
            at_reference,
        ),
    ]
    common.print_targets(targets)
    # Conversion runs on the host (JAX_PLATFORMS=cpu in its processes) on any machine.
    device = "cpu"
    path = common.write_result(
        "convert",
        device,
        dict(
            config=dict(preset=args.preset, dtype=args.dtype, num_tensors=len(tensors)),
            rows=rows,
            summary=summary,
            targets=targets,
            units=dict(seconds="s", peak_rss_gb="GB (1e9 bytes)"),
        ),
        quick=not at_reference,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
