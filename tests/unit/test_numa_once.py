"""ep_train.parallel.groups.read_numa_layout_once: DeepSpeed's CPU accelerator asks numactl once per process,
not once per ``device_count()`` call (ZeRO-3 calls it for every gradient bucket)."""

from __future__ import annotations

import pytest

HARDWARE = ("available: 2 nodes (0-1)\nnode 0 cpus: 0 1\nnode 0 size: 100 MB\n"
            "node 1 cpus: 2 3\nnode 1 size: 100 MB\n")


def test_numactl_runs_once_and_callers_get_their_own_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.utils.numa as numa
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from ep_train.parallel.groups import read_numa_layout_once

    calls = []

    def check_output(args, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(list(args))
        return HARDWARE.encode()

    monkeypatch.setattr(numa.subprocess, "check_output", check_output)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    # DeepSpeed's own function (an earlier read_numa_layout_once in this process may have wrapped it),
    # put back after the test
    monkeypatch.setattr(numa, "get_numa_cores", getattr(numa.get_numa_cores, "ep_train_original",
                                                        numa.get_numa_cores))
    acc = CPU_Accelerator()
    assert acc.device_count() == 2 and acc.device_count() == 2
    assert len(calls) == 2  # DeepSpeed's own: a numactl process per call
    read_numa_layout_once()
    read_numa_layout_once()  # a second call does not wrap again
    assert [acc.device_count() for _ in range(5)] == [2] * 5
    assert len(calls) == 3 and calls[-1] == ["numactl", "--hardware"]
    layout = numa.get_numa_cores()
    assert layout == [[0, 1], [2, 3]]
    layout[0].append(99)  # a caller changing its copy changes nobody else's
    assert numa.get_numa_cores() == [[0, 1], [2, 3]] and len(calls) == 3
