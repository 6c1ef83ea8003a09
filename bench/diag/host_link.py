"""What offloading activations to host memory could move during a step: the device-host link's
bandwidth, alone and beside compute.

Copies between device memory and pinned host memory on a side stream, in each direction and
both at once, alone and while the default stream runs fp32 matmuls shaped as GPT-2 medium's MLP
(8192×1024 by 1024×4096); reports each copy's bandwidth and the matmuls' slowdown.

    python bench/diag/host_link.py
"""

import statistics

import torch

MiB = 2**20


def median_s(work, repeats: int = 5) -> float:
    """Median seconds of ``work()``'s returned CUDA-event pair over ``repeats`` runs, after one
    warm-up, each run begun on an idle device."""
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start, end = work()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def main() -> None:
    side = [torch.cuda.Stream(), torch.cuda.Stream()]
    a = torch.randn(8192, 1024, device="cuda")
    b = torch.randn(1024, 4096, device="cuda")
    matmuls = 40
    flops = 2 * 8192 * 1024 * 4096 * matmuls

    def compute():
        start, end = events()
        start.record()
        for _ in range(matmuls):
            torch.mm(a, b)
        end.record()
        return start, end

    alone_s = median_s(compute)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{matmuls} fp32 matmuls alone: {alone_s * 1e3:.2f} ms, "
          f"{flops / alone_s / 1e12:.1f} TFLOP/s "
          f"(TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})\n")
    print("| copy | MiB per copy | alone GB/s | beside matmuls GB/s | matmuls beside copies |")
    print("|---|---|---|---|---|")
    for size in (32 * MiB, 128 * MiB, 512 * MiB):
        device = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(2)]
        host = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        directions = {
            "device to host": [(host[0], device[0])],
            "host to device": [(device[1], host[1])],
            "both at once": [(host[0], device[0]), (device[1], host[1])],
        }
        copies = max(1, round(alone_s * 50e9 / size))  # about as long as the matmuls
        for name, pairs in directions.items():
            def copy(pairs=pairs, during=lambda: None):
                """Each direction on a side stream of its own, while the default stream runs
                ``during``; the pair spans them all."""
                start, end = events()
                start.record()
                for stream, (target, source) in zip(side, pairs):
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(copies):
                            target.copy_(source, non_blocking=True)
                during_events = during()
                for stream in side[:len(pairs)]:
                    torch.cuda.current_stream().wait_stream(stream)
                end.record()
                return (start, end), during_events

            def copy_beside_compute():
                """The copies while the default stream computes: the pair times the matmuls;
                the copies' span is kept in ``copy_events``."""
                copy_events_now, compute_events = copy(during=compute)
                copy_events.append(copy_events_now)
                return compute_events

            moved = copies * size * len(pairs)
            copy_s = median_s(lambda: copy()[0])
            copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
            compute_beside_s = median_s(copy_beside_compute)
            # Copies and matmuls began together; the later of the two ends the span.
            span_s = statistics.median(start.elapsed_time(end) / 1e3
                                       for start, end in copy_events[1:])
            print(f"| {name} | {size // MiB} (×{copies}) | {moved / copy_s / 1e9:.1f} | "
                  f"≥ {moved / span_s / 1e9:.1f} | {compute_beside_s * 1e3:.2f} ms "
                  f"({compute_beside_s / alone_s:.2f}×) |")
    print("\n'beside matmuls' divides the bytes by the span from the copies' start to the "
          "later of their end and the matmuls' end: a lower bound on the copies' rate.")


if __name__ == "__main__":
    main()
