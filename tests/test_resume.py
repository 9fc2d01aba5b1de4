"""Resume a crashed or interrupted run: the same run continues, equals an uninterrupted one, replays faithfully."""
from __future__ import annotations

import os
import signal
import time

import pytest

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace
from flor_nb import errors

STOPPABLE = TRAIN.replace("    sched.step()\n", "    if epoch == 3 and os.path.exists(STOP):\n"
                                                 "        raise KeyboardInterrupt\n    sched.step()\n")


def _same_values(a, b, store):
    """The runs logged the same values, bit for bit (NaN where neither logged)."""
    import pandas as pd

    frames = [flor.dataframe("loss", "acc", run=r, store=store).drop(columns=["name", "version"]) for r in (a, b)]
    assert len(frames[0]) > 10
    pd.testing.assert_frame_equal(*frames, check_exact=True)


def test_resume_after_an_interrupt_uses_the_live_objects_and_continues_the_run(store, tmp_path):
    stop = tmp_path / "stop"
    cells = [f"import os\nSTOP = {str(stop)!r}\nEPOCHS = 6\n{SETUP}"]
    ns = setup_namespace(6)
    exec(cells[0], ns)
    stop.touch()
    with pytest.raises(KeyboardInterrupt):
        flor.record(STOPPABLE, name="cut", namespace=ns, cells=cells, store=store, overhead=float("inf"))
    assert flor.get_run("cut", store=store).status == "interrupted"
    stop.unlink()
    model = ns["model"]
    run = flor.resume("cut", namespace=ns, store=store)
    assert ns["model"] is model  # the kernel survived: its objects were restored and trained on
    assert run.label == "cut@1" and run.status == "finished" and run.epochs_completed == 6
    assert run.state["resumes"][0]["from_epoch"] == 3 and run.state["resumes"][0]["rebuilt"] is False
    truth_ns = setup_namespace(6)
    exec(cells[0], truth_ns)
    flor.record(STOPPABLE, name="truth", namespace=truth_ns, cells=cells, store=store, overhead=float("inf"))
    _same_values("cut@1", "truth@1", store)
    assert sorted(store.checkpoints(run.id)) == [-1, 0, 1, 2, 3, 4, 5]
    df = flor.replay("cut", epochs="2-4", store=store)  # across the resume point
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    with pytest.raises(errors.FlorError, match="finished all its epochs; there is nothing to resume"):
        flor.resume("cut", namespace=ns, store=store)


KERNEL_SETUP = (
    "import time\nimport torch, torch.nn as nn, torch.nn.functional as F\ntorch.manual_seed(0)\n"
    "X = torch.randn(192, 8); y = (X[:, :2].sum(1) > 0).long()\n"
    "model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 2))\n"
    "opt = torch.optim.Adam(model.parameters(), lr=1e-2)\n"
    "sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)"
)
KERNEL_TRAIN = (
    "history = []\n"
    "for epoch in range(8):\n"
    "    perm = torch.randperm(192)\n"
    "    for i in range(0, 192, 32):\n"
    "        loss = F.cross_entropy(model(X[perm[i:i + 32]]), y[perm[i:i + 32]])\n"
    "        opt.zero_grad(); loss.backward(); opt.step()\n"
    "        flor.log('loss', loss.item())\n"
    "        time.sleep(0.04)\n"
    "    sched.step()\n"
    "    history.append(loss.item())\n"
    "    flor.log('acc', float((model(X).argmax(1) == y).float().mean()))\n"
)


def _descendants(pid: int) -> set[int]:
    from test_workers import _children

    return _children(pid)


def _alive(pid):
    from test_workers import _alive as alive

    return alive(pid)


class _Kernel:
    """A real ipykernel (jupyter_client), cells run one by one, outputs kept as text."""

    def __init__(self, cwd):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def run(self, code, timeout=240, after_error=False) -> str:
        """``after_error``: the cell just before ended in an error (an interrupt), and the kernel aborts what
        reaches it while it drops its queue: send it again until it runs."""
        for _ in range(40 if after_error else 1):
            text, status = self._run(code, timeout)
            if status != "aborted":
                break
            time.sleep(0.25)
        assert status == "ok", text
        return text

    def _run(self, code, timeout) -> tuple[str, str]:
        out = []

        def keep(msg):
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(content["traceback"]))
            elif "data" in content:
                out.append(content["data"].get("text/plain", ""))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=keep)
        return "".join(out), reply["content"]["status"]

    def start(self, code):
        self.kc.execute(code)

    def close(self):
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=True)
        else:
            self.km.cleanup_resources()


@pytest.mark.timeout(400)
def test_sigkilled_kernel_is_resumed_in_a_new_kernel(store, tmp_path):
    first = _Kernel(tmp_path)
    try:
        first.run("%load_ext flor_nb")
        first.run(KERNEL_SETUP)
        first.start("%%flor record --name crash --no-progress\n" + KERNEL_TRAIN)
        deadline = time.monotonic() + 120
        run = None
        while time.monotonic() < deadline:
            try:
                run = flor.get_run("crash", store=store)
                if run.epochs_completed >= 3:
                    break
            except errors.UnknownRunError:
                pass
            time.sleep(0.05)
        assert run is not None and run.epochs_completed >= 3
        helpers = _descendants(first.pid)  # the replay workers %load_ext started, and their forkserver
        os.kill(first.pid, signal.SIGKILL)
        first.km.provisioner.process.wait()
    finally:
        first.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in helpers):
        time.sleep(0.1)
    assert helpers and not [p for p in helpers if _alive(p)], "processes of the killed kernel live on"
    crashed = flor.get_run("crash", store=store)
    assert crashed.status == "interrupted" and 3 <= crashed.epochs_completed < 8
    second = _Kernel(tmp_path)
    try:
        second.run("%load_ext flor_nb")
        said = second.run("%flor resume crash --no-progress")
        assert "flor_nb: resumed crash@1 at epoch" in said and "objects rebuilt from its recorded cells" in said, said
        assert "flor_nb: finished crash@1: 8 epochs" in said, said
        second.run(KERNEL_SETUP)
        second.run("%%flor record --name truth --no-progress\n" + KERNEL_TRAIN)  # the same run, never interrupted
    finally:
        second.close()
    resumed = flor.get_run("crash@1", store=store)
    start = resumed.state["resumes"][0]["from_epoch"]
    assert resumed.status == "finished" and resumed.epochs_completed == 8 and 1 <= start <= crashed.epochs_completed
    _same_values("crash@1", "truth@1", store)  # bit for bit, across the crash
    df = flor.replay("crash", epochs=f"{start - 1}-{start + 1}", store=store)  # across the resume point
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
