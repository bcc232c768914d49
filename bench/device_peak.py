r"""Measured dense matmul peak of this machine: one TFLOP/s figure per dtype, for MFU against a real number.

    python bench/device_peak.py                      # fp32 and bf16 on CUDA when present, else the CPU
    python bench/device_peak.py --device cpu --size 2048 --dtypes fp32 bf16

Data sheets give no CPU figure, and a vendor's GPU figure may not be reachable on a given part or clock, so
train_bench.py --measure-peak (or --device-peak-tflops with the figure printed here) computes MFU against this
measurement. The figure is the best of --repeats timings of square matmuls at the current thread count.
"""

import argparse
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize_device(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measured_matmul_tflops(dtype: torch.dtype, device: str, size: int, repeats: int = 5, matmuls: int = 4) -> float:
    """Best TFLOP/s of `matmuls` back-to-back size x size matmuls, over `repeats` timings (one untimed warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for repeat in range(repeats + 1):
        synchronize_device(device)
        start = time.perf_counter()
        for _ in range(matmuls):
            torch.mm(a, b)
        synchronize_device(device)
        if repeat:
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * matmuls / best / 1e12


def default_size(device: str) -> int:
    """Large enough to reach the plateau, small enough to take about a second on two CPU cores."""
    return 8192 if device == "cuda" else 2048


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--size", type=int, default=None, help="Side of the square matrices (default: by device).")
    parser.add_argument("--repeats", type=int, default=5, help="Timings; the best one counts.")
    args = parser.parse_args()
    size = args.size or default_size(args.device)
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    for name in args.dtypes:
        tflops = measured_matmul_tflops(DTYPES[name], args.device, size, args.repeats)
        print(f"device_peak | {args.device}{threads} | {name} matmul {size}x{size} | TFLOP/s: {tflops:.4f}")


if __name__ == "__main__":
    main()
