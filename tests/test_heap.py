"""rcat.heap: trimming malloc's free memory, and the per-shape convolution caches bounded at process start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rcat import heap


def test_free_heap_memory_is_trimmed_only_past_the_threshold(monkeypatch):
    trims: list[int] = []

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append(pad)

    free = iter([heap.TRIM_FREE_BYTES, heap.TRIM_FREE_BYTES + 1, 0])
    monkeypatch.setattr(heap, "_glibc", lambda: FakeLibc())
    monkeypatch.setattr(heap, "free_heap_bytes", lambda: next(free))
    assert heap.release_free_memory() is False  # exactly the threshold free: nothing to give
    assert heap.release_free_memory() is True and trims == [0]
    assert heap.release_free_memory() is False and trims == [0]


def test_trimming_hands_fragmented_free_memory_back():
    if heap._glibc() is None:
        pytest.skip("not glibc")
    big = torch.ones(1024, 1024)  # 4 MiB: mapped, and its free raises glibc's dynamic mmap threshold past 1 MiB blocks
    del big
    blocks = [torch.ones(512, 512) for _ in range(64)]  # 64 MiB of 1 MiB blocks from the heap
    kept = blocks[::8]  # every eighth stays: the free ones cannot all be returned from the top of the heap
    del blocks
    before = heap.resident_bytes()
    assert heap.free_heap_bytes() > heap.TRIM_FREE_BYTES
    assert heap.release_free_memory() is True
    assert before - heap.resident_bytes() > 32 * 2**20
    assert len(kept) == 8


def test_shape_cache_bounds_are_defaults_a_user_value_overrides(monkeypatch):
    for name in heap.SHAPE_CACHE_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    in_effect = heap.bound_shape_caches()
    assert in_effect == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": heap.SHAPE_CACHE_LIMITS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], "LRU_CACHE_CAPACITY": "7"}
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == heap.SHAPE_CACHE_LIMITS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]


# A small CNN's input gradient on 55 batch sizes (an attack meets a new shape in almost every
# batch); the live heap's growth over the last 20 shapes, when any cap is full, and a digest of
# every gradient. The caches are read at the first convolution, so each setting needs a process.
_SHAPES_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from rcat import heap
    if sys.argv[1] == "bounded":
        heap.bound_shape_caches()
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 10))
    x, y = torch.rand(120, 3, 16, 16), torch.randint(0, 10, (120,))
    digest = hashlib.sha256()
    for k, n in enumerate(range(60, 115)):
        inputs = x[:n].clone().requires_grad_(True)
        gradient, = torch.autograd.grad(torch.nn.functional.cross_entropy(net(inputs), y[:n]), inputs)
        digest.update(gradient.numpy().tobytes())
        if k == 34:
            start = heap.heap_in_use_bytes()
    print(json.dumps({"growth_mb": (heap.heap_in_use_bytes() - start) / 2**20, "digest": digest.hexdigest()}))
""")


def test_bounded_shape_caches_stop_the_growth_and_change_no_gradient():
    if heap.heap_in_use_bytes() is None:
        pytest.skip("not glibc")
    runs = {}
    for mode in ("bounded", "default"):
        env = {key: value for key, value in os.environ.items() if key not in heap.SHAPE_CACHE_LIMITS}
        if mode == "default":  # torch's own capacities, whatever the calling environment says
            env.update({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
        done = subprocess.run([sys.executable, "-c", _SHAPES_SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["bounded"]["digest"] == runs["default"]["digest"]  # the caches hold kernels, not results
    assert runs["bounded"]["growth_mb"] < 1.0, runs
    assert runs["default"]["growth_mb"] > runs["bounded"]["growth_mb"] + 2.0, runs  # torch still grows them: the bound is needed


def test_the_stages_and_the_command_line_bound_the_caches_before_any_work(monkeypatch):
    from conftest import REPO_ROOT
    from rcat.stages.runner import run_stage

    for name in heap.SHAPE_CACHE_LIMITS:
        monkeypatch.delenv(name, raising=False)
    seen = run_stage(lambda params, layout, tracker: {name: os.environ.get(name) for name in heap.SHAPE_CACHE_LIMITS},
                     params_path=str(REPO_ROOT / "params.yaml"))
    assert seen == heap.SHAPE_CACHE_LIMITS
    env = {key: value for key, value in os.environ.items() if key not in heap.SHAPE_CACHE_LIMITS}
    code = ("import os, sys\nfrom rcat.cli import main\nsys.argv = ['rcat', '--version']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'), os.environ.get('LRU_CACHE_CAPACITY'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split()[-2:] == [heap.SHAPE_CACHE_LIMITS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], heap.SHAPE_CACHE_LIMITS["LRU_CACHE_CAPACITY"]]
