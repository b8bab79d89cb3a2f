"""The side-thread registry that lets a fresh process compile its Triton search while the job starts
(``kernels/pending.py``): the first call that needs the work waits for it, whatever spelling of the device
the job and the tensors use, and an error on the side thread reaches the caller. Runs without CUDA or triton."""

import threading

import pytest
import torch

from moequant.kernels.pending import Pending, device_key


def test_a_bare_cuda_device_is_the_current_one():
    # a job is given "cuda"; its tensors report cuda:N. One device, one key (index 0 where no CUDA device exists)
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert device_key("cuda") == device_key(torch.device("cuda", current)) == torch.device("cuda", current)
    assert device_key("cuda:1") == torch.device("cuda", 1)
    assert device_key("cpu") == torch.device("cpu")


def test_the_first_caller_waits_for_the_work_started_under_another_spelling():
    release, done = threading.Event(), []
    pending = Pending("test work")

    def work(device):
        release.wait(5)
        done.append(device)

    assert pending.start(torch.device("cuda"), work)
    assert not pending.start("cuda:0", work), "a second start for the same device must not run the work again"
    release.set()
    pending.wait(torch.device("cuda", 0))   # the tensors' spelling
    assert done == [torch.device("cuda", 0)], "wait() returned before the side thread finished (or missed it)"
    pending.wait("cuda:0")                  # already waited for: returns at once


def test_an_error_on_the_side_thread_is_raised_to_the_waiter():
    pending = Pending("compiling the test kernel")

    def work(device):
        raise ValueError("ptxas exploded")

    pending.start("cuda:0", work)
    with pytest.raises(RuntimeError, match="compiling the test kernel for cuda:0 failed") as info:
        pending.wait("cuda")
    assert isinstance(info.value.__cause__, ValueError)
