"""ZeRO-Offload's copies between the device and pinned host memory: on CUDA on a side stream,
bucket by bucket, with events the host waits on; elsewhere a plain ``copy_``.

    compute stream   reduce-scatter ─┬─ (whatever the rank queues next) ──────── all-gather
    copy stream                      └─ D2H b0 ─ D2H b1 ─ ...        H2D ──────┘
    host                                   wait b0, b1, ... ─ CPU Adam ─┘

The copy stream waits for the compute stream only at the point the copy is asked for (the
reduction that wrote the shard), so later device work is not held up; the host reads the shard
only after each bucket's event (``host_ready``); the stream that next reads the updated
parameters waits for the H2D copy. The gradient shard is reduced once per step after this
rank's last backward, so what the D2H overlaps is the work queued after it, not the backward
(that needs reductions started per bucket as its gradients become final: docs/zero.md).
"""

from __future__ import annotations

import torch

_BUCKET_ELEMENTS = 1 << 22  # 16 MiB of fp32 per copy: each bucket's event lets the host start reading sooner


class HostTransfers:
    """Copies between a device tensor and its host copy for one optimizer shard."""

    def __init__(self, device: torch.device, bucket_elements: int = _BUCKET_ELEMENTS) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.bucket_elements = bucket_elements
        self._pending: list[torch.cuda.Event] = []

    def to_host(self, host: torch.Tensor, device_tensor: torch.Tensor) -> None:
        """Start copying ``device_tensor`` into ``host`` (pinned); ``host_ready`` waits for it."""
        if self.stream is None:
            host.copy_(device_tensor)
            return
        self.stream.wait_stream(torch.cuda.current_stream(device_tensor.device))  # the reduction wrote it
        with torch.cuda.stream(self.stream):
            for lo in range(0, device_tensor.numel(), self.bucket_elements):
                hi = lo + self.bucket_elements
                host[lo:hi].copy_(device_tensor[lo:hi], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
                self._pending.append(event)
        device_tensor.record_stream(self.stream)  # (its memory is not reused before the copy ran)

    def host_ready(self) -> None:
        """Block until every started device-to-host copy has landed (before the host reads them)."""
        for event in self._pending:
            event.synchronize()
        self._pending.clear()

    def to_device(self, device_tensor: torch.Tensor, host: torch.Tensor) -> None:
        """Copy ``host`` into ``device_tensor``; device work queued after this call sees the values."""
        if self.stream is None:
            device_tensor.copy_(host)
            return
        current = torch.cuda.current_stream(device_tensor.device)
        self.stream.wait_stream(current)  # (nothing queued before still reads the old values)
        with torch.cuda.stream(self.stream):
            device_tensor.copy_(host, non_blocking=True)
        current.wait_stream(self.stream)
