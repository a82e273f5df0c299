"""Huge-page advice for the KV cache: huge pages are asked for (madvise) over
the whole tensor, and the tensor is an ordinary tensor whether or not the OS
grants 2 MB pages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.host import huge_pages
from engine.host.huge_pages import empty_with_huge_pages, gather_on_huge_pages


def test_an_advised_tensor_is_an_ordinary_tensor():
    t = empty_with_huge_pages(3, 1 << 20, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    t.zero_()[1, 5] = 2.0
    assert t.sum().item() == 2.0


def test_empty_tensors_and_other_dtypes():
    assert empty_with_huge_pages(0, 4, dtype=torch.int32, device=torch.device("cpu")).numel() == 0
    t = empty_with_huge_pages(7, dtype=torch.bfloat16, device=torch.device("cpu")).fill_(1.5)
    assert t.float().sum().item() == 10.5


def test_gathered_tensors_are_equal_copies_in_one_huge_page_aligned_allocation(monkeypatch):
    calls = _advice_spy(monkeypatch)
    tensors = [
        torch.randn(5, 7),
        torch.arange(3, dtype=torch.int32),
        torch.randn(33, dtype=torch.float64).to(torch.bfloat16),
        torch.randn(300, 1000)[:, ::2],  # not contiguous: the copy is
    ]
    copies = gather_on_huge_pages(tensors)
    for t, c in zip(tensors, copies, strict=True):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous()
        assert torch.equal(c, t)
    ((start, length, _),) = calls  # one allocation, advised once
    storage = copies[0].untyped_storage().data_ptr()
    assert all(c.untyped_storage().data_ptr() == storage for c in copies)
    # The first starts on a 2 MB boundary, each on a 64-byte one, none overlapping.
    assert copies[0].data_ptr() % (2 << 20) == 0
    ends = [c.data_ptr() + c.numel() * c.element_size() for c in copies]
    for c, end_before in zip(copies[1:], ends, strict=False):
        assert c.data_ptr() % 64 == 0 and c.data_ptr() >= end_before
    assert start <= copies[0].data_ptr() and ends[-1] <= start + length
    assert gather_on_huge_pages([]) == []


def _advice_spy(monkeypatch) -> list[tuple[int, int, int]]:
    calls = []

    def madvise(start: int, length: int, advice: int) -> int:
        calls.append((start, length, advice))
        return 0

    monkeypatch.setattr(huge_pages, "_madvise", lambda: madvise)
    return calls


def test_huge_pages_are_asked_for_the_whole_tensor(monkeypatch):
    calls = _advice_spy(monkeypatch)
    t = empty_with_huge_pages(3, 1 << 20, dtype=torch.float32, device=torch.device("cpu"))
    ((start, length, advice),) = calls
    assert advice == huge_pages.MADV_HUGEPAGE
    # madvise wants a page-aligned start; the range must still cover every byte.
    assert start % 4096 == 0 and start <= t.data_ptr()
    assert start + length >= t.data_ptr() + t.numel() * t.element_size()


def test_no_advice_for_empty_or_non_cpu_tensors(monkeypatch):
    calls = _advice_spy(monkeypatch)
    empty_with_huge_pages(0, 4, dtype=torch.int32, device=torch.device("cpu"))
    empty_with_huge_pages(1 << 20, dtype=torch.float32, device=torch.device("meta"))
    assert calls == []


def _smaps_entry(smaps: str, address: int) -> dict[str, str] | None:
    """The fields of the mapping in `smaps` (a /proc/PID/smaps) that holds `address`."""
    entry = None
    for line in smaps.splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            low, high = (int(x, 16) for x in first.split("-"))
            entry = {} if low <= address < high else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
            if key == "VmFlags":  # the last field of a mapping
                return entry
    return None


def _thp_mode() -> str | None:
    """The kernel's THP mode (always, madvise, never), or None without THP."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    return path.read_text().split("[")[1].split("]")[0]


# Run in a fresh interpreter: in this one, memory freed by earlier tests'
# advised tensors (KV caches) may be handed out again still marked, which
# would make an unadvised tensor look advised. The plain tensor comes first,
# before anything in that process was advised; 12 MB gets a mapping of its own.
_CHILD = """
import json, torch
from engine.host.huge_pages import empty_with_huge_pages
plain = torch.empty(3, 1 << 20)
advised = empty_with_huge_pages(3, 1 << 20, dtype=torch.float32, device=torch.device("cpu"))
print(json.dumps({"plain": plain.data_ptr(), "advised": advised.data_ptr(),
                  "smaps": open("/proc/self/smaps").read()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and smaps are Linux's")
def test_the_kernel_marks_the_memory_for_huge_pages():
    if _thp_mode() is None:
        pytest.skip(
            "this kernel has no transparent huge pages (no /sys/kernel/mm/transparent_hugepage)"
        )
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=root, capture_output=True, text=True, check=True
    )
    seen = json.loads(child.stdout)
    advised = _smaps_entry(seen["smaps"], seen["advised"])
    plain = _smaps_entry(seen["smaps"], seen["plain"])
    if advised is None or plain is None:
        pytest.skip("/proc/self/smaps shows no VmFlags here")
    # "hg" is VM_HUGEPAGE, which only madvise(MADV_HUGEPAGE) sets.
    assert "hg" in advised["VmFlags"].split(), advised
    assert "hg" not in plain["VmFlags"].split(), plain
    if _thp_mode() != "never":  # eligible for 2 MB pages (granted or not)
        assert advised["THPeligible"] == "1", advised
